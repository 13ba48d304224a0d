"""PII redaction: e-mail addresses, IPv4 addresses and phone numbers become replacement tokens.

Dolma's rules and tokens (|||EMAIL_ADDRESS|||, |||IP_ADDRESS|||, |||PHONE_NUMBER|||). E-mails go first (an address
may hold digits that look like a phone number), then IPs, then phones. Phone numbers are North-American
(optionally +1, area code in parentheses or not, separated by space, dot or dash) or international (+ and a
country code, then 7 to 12 more digits in groups), so dates and years are not taken for phones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]\d)")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r"|\+\d{1,3}(?:[ .-]\d{1,4}){2,4}"  # international: +CC and groups
    r")(?!\w)"
)


@dataclass(frozen=True)
class PIIConfig:
    email_token: str = "|||EMAIL_ADDRESS|||"
    ip_token: str = "|||IP_ADDRESS|||"
    phone_token: str = "|||PHONE_NUMBER|||"


def redact(text: str, config: PIIConfig) -> tuple[str, list[tuple[str, str]]]:
    """(redacted text, [(kind, matched string), ...] in the order found)."""
    found: list[tuple[str, str]] = []
    for kind, pattern, token in (
        ("email", EMAIL, config.email_token),
        ("ip", IPV4, config.ip_token),
        ("phone", PHONE, config.phone_token),
    ):

        def replace(match: re.Match, kind: str = kind, token: str = token) -> str:
            if kind == "phone" and sum(ch.isdigit() for ch in match.group()) < 9:
                return match.group()  # too few digits for a phone number: a score or an index
            found.append((kind, match.group()))
            return token

        text = pattern.sub(replace, text)
    return text, found
