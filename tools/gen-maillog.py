#!/usr/bin/env python3
"""Writes a synthetic Postfix log for `greygate track` benchmarks: N lines of realistic
outbound traffic (smtpd/cleanup/qmgr/smtp lines per message, 30 % of destinations
greylisting the first attempt, a few bounces), deterministic for a given seed.

    tools/gen-maillog.py LINES [SEED] > maillog
"""
import random
import sys

lines_wanted = int(sys.argv[1])
rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
domains = [f"d{i}.example" for i in range(500)]
greylisting = set(rng.sample(domains, 150))
out = sys.stdout
written = 0
t = 0  # seconds since Nov 28 00:00:00
qid = 0x10000000
buf = []


def stamp(sec):
    sec %= 86400
    return f"Nov 28 {sec // 3600:02}:{sec // 60 % 60:02}:{sec % 60:02} relay1"


while written < lines_wanted:
    before = len(buf)
    qid += 1
    q = f"{qid:X}"
    t += rng.randint(0, 2)
    dom = rng.choice(domains)
    rcpt = f"user{rng.randint(1, 99999)}@{dom}"
    ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    buf.append(f"{stamp(t)} postfix/smtpd[{rng.randint(1000, 9999)}]: {q}: client=sender.example[{ip}]")
    buf.append(f"{stamp(t)} postfix/cleanup[2001]: {q}: message-id=<{qid}.{t}@sender.example>")
    buf.append(f"{stamp(t)} postfix/qmgr[1001]: {q}: from=<news@sender.example>, size={rng.randint(900, 90000)}, nrcpt=1 (queue active)")
    mx = f"mx.{dom}[192.0.2.{rng.randint(1, 254)}]:25"
    if dom in greylisting:
        buf.append(f"{stamp(t + 1)} postfix/smtp[3001]: {q}: to=<{rcpt}>, relay={mx}, delay=1.2, delays=0.1/0/0.6/0.5, dsn=4.7.1, status=deferred (host {mx[:-3]} said: 450 4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, please try again later (in reply to RCPT TO command))")
        delay = rng.choice([300, 600, 960, 1380])
        buf.append(f"{stamp(t + delay)} postfix/smtp[3002]: {q}: to=<{rcpt}>, relay={mx}, delay={delay}, delays={delay - 1}/0/0.3/0.4, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X{qid:X})")
    elif rng.random() < 0.02:
        buf.append(f"{stamp(t + 1)} postfix/smtp[3001]: {q}: to=<{rcpt}>, relay={mx}, delay=0.9, delays=0.1/0/0.4/0.4, dsn=5.1.1, status=bounced (host {mx[:-3]} said: 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown (in reply to RCPT TO command))")
    else:
        buf.append(f"{stamp(t + 1)} postfix/smtp[3001]: {q}: to=<{rcpt}>, relay={mx}, delay=0.8, delays=0.1/0/0.3/0.4, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X{qid:X})")
    buf.append(f"{stamp(t + 1)} postfix/qmgr[1001]: {q}: removed")
    written += len(buf) - before
    if len(buf) > 10000:
        out.write("\n".join(buf))
        out.write("\n")
        buf.clear()
out.write("\n".join(buf))
out.write("\n")
