#!/usr/bin/env python3
"""Writes a synthetic Postfix log for `greygate track` benchmarks: N lines of realistic
outbound relay traffic in time order, deterministic for a given seed.

About 20 messages a second arrive (smtpd, cleanup, qmgr lines); one in ten has two or
three recipients. Of 500 destination domains, 150 greylist the first attempt (delivered
5 to 23 minutes later), 5 never answer (deferred every hour for five days, then expired
and returned), and 2 % of the other deliveries bounce. Lines of concurrent messages
interleave as in a real log, so a reader keeps thousands of messages in flight (about
90,000 at the peak, most of them the dead domains' five-day retries).

    tools/gen-maillog.py LINES [SEED] > maillog
"""
import heapq
import random
import sys

lines_wanted = int(sys.argv[1])
rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
domains = [f"d{i}.example" for i in range(500)]
greylisting = set(rng.sample(domains, 150))
dead = set(rng.sample(sorted(set(domains) - greylisting), 5))
out = sys.stdout

MONTH_DAYS = [("Nov", 30), ("Dec", 31), ("Jan", 31), ("Feb", 28), ("Mar", 31), ("Apr", 30)]
LIFETIME = 5 * 86400  # Postfix's maximal_queue_lifetime
stamp_cache = {}


def stamp(sec):
    """Syslog time for `sec` seconds after Nov 28 00:00:00."""
    s = stamp_cache.get(sec)
    if s is None:
        if len(stamp_cache) > 4096:
            stamp_cache.clear()
        day, rest = divmod(sec, 86400)
        day += 27  # Nov 28 is day 27 of November (0-based)
        for name, n in MONTH_DAYS:
            if day < n:
                break
            day -= n
        s = f"{name} {day + 1:2} {rest // 3600:02}:{rest // 60 % 60:02}:{rest % 60:02} relay1"
        stamp_cache[sec] = s
    return s


pending = []  # (second, sequence, line-without-stamp)
seq = 0


def later(sec, text):
    global seq
    seq += 1
    heapq.heappush(pending, (sec, seq, text))


written = 0
buf = []
qid = 0x10000000
t_ms = 0
while written < lines_wanted:
    t_ms += rng.randint(0, 100)
    t = t_ms // 1000
    while pending and pending[0][0] <= t and written < lines_wanted:
        sec, _, text = heapq.heappop(pending)
        buf.append(f"{stamp(sec)} {text}")
        written += 1
    if written >= lines_wanted:
        break
    qid += 1
    q = f"{qid:X}"
    ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    n = 1 if rng.random() < 0.9 else rng.randint(2, 3)
    rcpts = [(f"user{rng.randint(1, 99999)}@{d}", d) for d in rng.sample(domains, n)]
    buf.append(f"{stamp(t)} postfix/smtpd[{rng.randint(1000, 9999)}]: {q}: client=sender.example[{ip}]")
    buf.append(f"{stamp(t)} postfix/cleanup[2001]: {q}: message-id=<{qid}.{t}@sender.example>")
    buf.append(f"{stamp(t)} postfix/qmgr[1001]: {q}: from=<news@sender.example>, size={rng.randint(900, 90000)}, nrcpt={n} (queue active)")
    written += 3
    done = t + 1
    for rcpt, dom in rcpts:
        mx = f"mx.{dom}[192.0.2.{rng.randint(1, 254)}]:25"
        if dom in dead:
            for k in range(LIFETIME // 3600):
                at = t + 1 + 3600 * k
                later(at, f"postfix/smtp[3003]: {q}: to=<{rcpt}>, relay=none, delay={at - t}, delays={at - t}/0/30/0, dsn=4.4.1, status=deferred (connect to {mx[:-3]}:25: Connection refused)")
            done = max(done, t + LIFETIME + 60)
            later(t + LIFETIME + 60, f"postfix/qmgr[1001]: {q}: from=<news@sender.example>, status=expired, returned to sender")
        elif dom in greylisting:
            later(t + 1, f"postfix/smtp[3001]: {q}: to=<{rcpt}>, relay={mx}, delay=1.2, delays=0.1/0/0.6/0.5, dsn=4.7.1, status=deferred (host {mx[:-3]} said: 450 4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, please try again later (in reply to RCPT TO command))")
            delay = rng.choice([300, 600, 960, 1380])
            later(t + delay, f"postfix/smtp[3002]: {q}: to=<{rcpt}>, relay={mx}, delay={delay}, delays={delay - 1}/0/0.3/0.4, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X{qid:X})")
            done = max(done, t + delay)
        elif rng.random() < 0.02:
            later(t + 1, f"postfix/smtp[3001]: {q}: to=<{rcpt}>, relay={mx}, delay=0.9, delays=0.1/0/0.4/0.4, dsn=5.1.1, status=bounced (host {mx[:-3]} said: 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown (in reply to RCPT TO command))")
        else:
            later(t + 1, f"postfix/smtp[3001]: {q}: to=<{rcpt}>, relay={mx}, delay=0.8, delays=0.1/0/0.3/0.4, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X{qid:X})")
    later(done, f"postfix/qmgr[1001]: {q}: removed")
    if len(buf) > 10000:
        out.write("\n".join(buf))
        out.write("\n")
        buf.clear()
buf = buf[: len(buf) - max(0, written - lines_wanted)]
out.write("\n".join(buf))
out.write("\n")
