//! The big senders `greygate lists update` asks about when `[lists] domains` is not set.
//!
//! Each name is the domain a provider tells its customers to `include:` in their own SPF
//! records (or its own mail domain where it has no such name): records made to be included
//! stay well within RFC 7208's 10 lookups, and list the provider's outbound servers rather
//! than everything its customers use. Providers whose pools retry from another address —
//! the ones greylisting by IP prefix delays for hours — come first.

/// `(domain, who sends from its ranges)`.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("_spf.google.com", "Google: Gmail and Google Workspace"),
    (
        "spf.protection.outlook.com",
        "Microsoft: Outlook.com, Hotmail and Microsoft 365 (Exchange Online)",
    ),
    ("_spf.mail.yahoo.com", "Yahoo Mail and AOL"),
    ("amazonses.com", "Amazon SES (every region)"),
    ("sendgrid.net", "Twilio SendGrid"),
    ("servers.mcsv.net", "Mailchimp"),
    ("spf.mandrillapp.com", "Mandrill (Mailchimp Transactional)"),
    ("mailgun.org", "Mailgun"),
    ("spf.mtasv.net", "Postmark"),
    ("sparkpostmail.com", "SparkPost"),
    ("_spf.salesforce.com", "Salesforce"),
    ("mail.zendesk.com", "Zendesk"),
    ("spf.brevo.com", "Brevo (formerly Sendinblue)"),
    ("spf.mailjet.com", "Mailjet"),
    ("mktomail.com", "Adobe Marketo"),
    ("spf.constantcontact.com", "Constant Contact"),
    (
        "spf.messagelabs.com",
        "Broadcom Email Security.cloud (MessageLabs)",
    ),
    ("spf.smtp2go.com", "SMTP2GO"),
    ("_spf.elasticemail.com", "Elastic Email"),
    ("_spf.atlassian.net", "Atlassian: Jira and Confluence Cloud"),
];
