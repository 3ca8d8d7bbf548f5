//! Where a configuration problem is: `file:line:column` from the TOML text, for the daemon's
//! configuration and for `simulate`'s scenario files alike, and the collector that gathers
//! every problem of a file so that one run reports them all.

use std::fmt;

use serde::de::DeserializeOwned;

/// One configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file:line:column` or `file:line` when known, else the file or setting name.
    pub location: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

/// All problems found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The source of a configuration: its text and where it came from.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// `name:line:column` of a byte offset into the text.
    fn at(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{}:{line}:{col}", self.name)
    }

    /// Parses the text as TOML into `T`; a syntax or type error points at its line and
    /// column.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigErrors> {
        toml::from_str(self.text).map_err(|e| {
            let location = match e.span() {
                Some(span) => self.at(span.start),
                None => self.name.to_string(),
            };
            ConfigErrors(vec![ConfigError {
                location,
                message: e.message().trim().to_string(),
            }])
        })
    }

    /// `file:line:column` of the value at `path` (`["policy", "listen", "0"]`; numbers index
    /// arrays and arrays of tables). With `nearest`, a value that is not written (a default
    /// that failed a check with another) is reported at the deepest table that is;
    /// without, it is named by its path.
    fn locate(&self, path: &[&str], nearest: bool) -> String {
        let span_of = |item: &toml_edit::Item| {
            item.span()
                .or_else(|| item.as_table().and_then(|t| t.span()))
        };
        let found = toml_edit::Document::parse(self.text).ok().and_then(|doc| {
            let mut item = doc.as_item().clone();
            let mut deepest = None;
            for p in path {
                let next = match (p.parse::<usize>(), &item) {
                    (Ok(i), toml_edit::Item::ArrayOfTables(a)) => {
                        a.get(i).map(|t| toml_edit::Item::Table(t.clone()))
                    }
                    (Ok(i), toml_edit::Item::Value(toml_edit::Value::Array(a))) => {
                        a.get(i).map(|v| toml_edit::Item::Value(v.clone()))
                    }
                    _ => item.get(p).cloned(),
                };
                let Some(next) = next else {
                    return if nearest { deepest } else { None };
                };
                item = next;
                deepest = span_of(&item).or(deepest);
            }
            span_of(&item).or(if nearest { deepest } else { None })
        });
        match found {
            Some(span) => self.at(span.start),
            None => format!("{} [{}]", self.name, path.join(".")),
        }
    }
}

/// Gathers the problems of one file while its sections are checked.
pub struct Problems<'a> {
    src: Option<&'a Source<'a>>,
    nearest: bool,
    errors: Vec<ConfigError>,
}

impl<'a> Problems<'a> {
    /// Problems located in `src`; without a source (built-in defaults, or tables embedded in
    /// another file) a problem is named by its setting's path, `greylist.delay`.
    pub fn new(src: Option<&'a Source<'a>>) -> Self {
        Problems {
            src,
            nearest: false,
            errors: Vec::new(),
        }
    }

    /// As `new`, but a setting that is not written is located at the nearest table that is.
    pub fn nearest(src: &'a Source<'a>) -> Self {
        Problems {
            src: Some(src),
            nearest: true,
            errors: Vec::new(),
        }
    }

    /// A problem with the setting at `path`.
    pub fn at(&mut self, path: &[&str], message: String) {
        let location = match self.src {
            Some(s) => s.locate(path, self.nearest),
            None => path.join("."),
        };
        self.errors.push(ConfigError { location, message });
    }

    /// A problem found elsewhere (an allow-list file's line).
    pub fn push(&mut self, e: ConfigError) {
        self.errors.push(e);
    }

    /// `value` when nothing was wrong, else every problem.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}
