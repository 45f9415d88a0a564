//! The detectors: every enabled entity pattern of a profile compiled into one multi-pattern
//! regex (`regex_automata::meta`, the regex crate's own engine, which reports which pattern
//! matched), searched in one pass; each candidate then passes its entity's check (Luhn and
//! issuer ranges for cards, mod-97 and the country length for IBANs, the SSA's invalid ranges
//! for SSNs, digit counts for phones, address parsing for IPs, token shape for keys).
//!
//! Every built-in pattern is written over one of three character classes (see
//! [`Classes`]), so a stream scanner knows how much of a stream's tail may still become a
//! match: the trailing run of each class.

use std::{ops::Range, sync::Arc};

use regex_automata::{Anchored, Input, PatternID, hybrid, meta};

/// A built-in entity type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Builtin {
    /// Email addresses.
    Email,
    /// Phone numbers: `+` and 8 to 15 digits (E.164), or North American numbers written
    /// with separators.
    Phone,
    /// Payment card numbers (13 to 19 digits, an issuer's range and length, Luhn).
    CreditCard,
    /// IBANs (country length and mod-97 checksum).
    Iban,
    /// US social security numbers written `AAA-GG-SSSS` (or with spaces), valid ranges only.
    UsSsn,
    /// IPv4 and IPv6 addresses.
    IpAddress,
    /// API keys and tokens of common providers (OpenAI, Anthropic, AWS, GitHub, Google,
    /// Slack), JWTs and PEM private-key blocks.
    Secret,
}

impl Builtin {
    /// Every built-in type.
    pub const ALL: [Builtin; 7] = [
        Builtin::Email,
        Builtin::Phone,
        Builtin::CreditCard,
        Builtin::Iban,
        Builtin::UsSsn,
        Builtin::IpAddress,
        Builtin::Secret,
    ];

    /// The name in config files, metrics and errors.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Email => "email",
            Builtin::Phone => "phone",
            Builtin::CreditCard => "credit_card",
            Builtin::Iban => "iban",
            Builtin::UsSsn => "us_ssn",
            Builtin::IpAddress => "ip_address",
            Builtin::Secret => "secret",
        }
    }

    /// Parses a name.
    pub fn parse(name: &str) -> Option<Builtin> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// How a candidate is checked before it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// The pattern says it all.
    None,
    /// Card: issuer range and length, Luhn.
    Card,
    /// IBAN: country length, mod 97.
    Iban,
    /// SSN ranges.
    Ssn,
    /// `+` international: 8 to 15 digits.
    PhoneIntl,
    /// North American: 10 digits (11 with the leading 1).
    PhoneNanp,
    /// IPv4 octets.
    Ipv4,
    /// IPv6 parses, and has a digit.
    Ipv6,
    /// A key body: has a digit.
    Token,
    /// A PEM private-key header: the entity runs to the END line (or the end of the text).
    Pem,
}

/// One pattern of a compiled detector set.
#[derive(Debug, Clone)]
pub(crate) struct PatternInfo {
    /// Index of the entity in the profile's entity table.
    pub entity: usize,
    pub check: Check,
}

/// A built-in pattern: regex, check.
fn builtin_patterns(b: Builtin) -> &'static [(&'static str, Check)] {
    match b {
        Builtin::Secret => &[
            (
                r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY-----",
                Check::Pem,
            ),
            (r"(?-u:\b)sk-ant-[A-Za-z0-9_-]{20,}", Check::Token),
            (
                r"(?-u:\b)sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
                Check::Token,
            ),
            (
                r"(?-u:\b)(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?-u:\b)",
                Check::None,
            ),
            (
                r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
                Check::None,
            ),
            (r"(?-u:\b)AIza[0-9A-Za-z_-]{35}", Check::None),
            (r"(?-u:\b)xox[abposr]-[A-Za-z0-9-]{10,}", Check::Token),
            (
                r"(?-u:\b)eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
                Check::None,
            ),
        ],
        Builtin::Iban => &[(
            r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,31}",
            Check::Iban,
        )],
        Builtin::CreditCard => &[(r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)", Check::Card)],
        Builtin::UsSsn => &[(
            r"(?-u:\b)[0-9]{3}([- ])[0-9]{2}[- ][0-9]{4}(?-u:\b)",
            Check::Ssn,
        )],
        Builtin::Email => &[(
            r"(?-u:\b)[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
            Check::None,
        )],
        Builtin::Phone => &[
            (
                r"(?:(?-u:\b)1[ .-]?)?(?:\([2-9][0-9]{2}\) ?|(?-u:\b)[2-9][0-9]{2}[ .-]?)[2-9][0-9]{2}[ .-][0-9]{4}(?-u:\b)",
                Check::PhoneNanp,
            ),
            (
                r"\+[1-9][0-9]{0,3}(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,6})){1,7}(?-u:\b)",
                Check::PhoneIntl,
            ),
        ],
        Builtin::IpAddress => &[
            (
                r"(?-u:\b)(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?-u:\b)",
                Check::Ipv4,
            ),
            (r"(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}", Check::Ipv6),
        ],
    }
}

/// The order built-ins are tried at one position (earlier wins): secrets before the
/// numbers inside them, IBANs and cards before phones.
const PRIORITY: [Builtin; 7] = [
    Builtin::Secret,
    Builtin::Iban,
    Builtin::CreditCard,
    Builtin::UsSsn,
    Builtin::Email,
    Builtin::IpAddress,
    Builtin::Phone,
];

/// What a scanner must hold back of a stream's tail: the trailing runs of these classes
/// may still grow into a match, and configured patterns need `fixed` bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Classes {
    /// `[A-Za-z0-9._%+@=/:-]` runs: emails, keys, tokens, JWTs, IP addresses.
    pub token: bool,
    /// `[0-9 ()+.-]` runs with a digit: cards, phones, SSNs.
    pub digits: bool,
    /// `[A-Z0-9 -]` runs: IBANs, PEM headers.
    pub upper: bool,
    /// The longest match of configured patterns and deny-list terms: the window a stream
    /// scanner looks back over for a tail that may still grow into one of them.
    pub fixed: usize,
}

/// Something found: the entity (index into the profile's table) and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Index of the entity in the profile's table.
    pub entity: usize,
    /// Byte range in the text.
    pub range: Range<usize>,
}

/// A compiled detector set.
#[derive(Debug, Clone)]
pub struct Detector {
    re: Option<Arc<meta::Regex>>,
    /// The configured patterns (and deny terms) alone, anchored: a stream scanner walks it
    /// over its tail to hold only what may still grow into their match. `None` without
    /// configured patterns, or if it cannot be built (then it holds their longest match).
    extra: Option<Arc<hybrid::dfa::DFA>>,
    patterns: Vec<PatternInfo>,
    /// What a stream scanner must hold back.
    pub classes: Classes,
}

/// A configured pattern: its entity index, regex source and longest match.
#[derive(Debug, Clone)]
pub(crate) struct Extra {
    pub entity: usize,
    pub regex: String,
}

impl Detector {
    /// Compiles the enabled built-ins (`builtins[i]` = entity index of each, in any order)
    /// and configured patterns into one regex.
    pub(crate) fn new(builtins: &[(Builtin, usize)], extra: &[Extra]) -> Result<Self, String> {
        let mut sources: Vec<String> = Vec::new();
        let mut patterns = Vec::new();
        let mut classes = Classes::default();
        for b in PRIORITY {
            let Some((_, entity)) = builtins.iter().find(|(x, _)| *x == b) else {
                continue;
            };
            match b {
                Builtin::Email | Builtin::Secret | Builtin::IpAddress => classes.token = true,
                Builtin::Phone | Builtin::CreditCard | Builtin::UsSsn => classes.digits = true,
                Builtin::Iban => classes.upper = true,
            }
            if b == Builtin::Secret {
                classes.upper = true;
            }
            if b == Builtin::IpAddress {
                classes.digits = true;
            }
            for (src, check) in builtin_patterns(b) {
                sources.push((*src).to_owned());
                patterns.push(PatternInfo {
                    entity: *entity,
                    check: *check,
                });
            }
        }
        for e in extra {
            let hir = regex_syntax::parse(&e.regex).map_err(|err| err.to_string())?;
            let longest = hir
                .properties()
                .maximum_len()
                .ok_or("must have a bounded length (no `*`, `+` or `{n,}`)")?;
            if longest > MAX_PATTERN_BYTES {
                return Err(format!(
                    "matches up to {longest} bytes; at most {MAX_PATTERN_BYTES} are allowed"
                ));
            }
            if hir.properties().minimum_len() == Some(0) {
                return Err("must not match the empty string".to_owned());
            }
            classes.fixed = classes.fixed.max(longest);
            sources.push(e.regex.clone());
            patterns.push(PatternInfo {
                entity: e.entity,
                check: Check::None,
            });
        }
        let extra_sources: Vec<&str> = extra.iter().map(|e| e.regex.as_str()).collect();
        let extra_dfa = (!extra_sources.is_empty())
            .then(|| {
                hybrid::dfa::DFA::builder()
                    .configure(
                        hybrid::dfa::DFA::config()
                            // Gives up (and the scanner holds) on non-ASCII near a `\b`.
                            .unicode_word_boundary(true)
                            .cache_capacity(1 << 20),
                    )
                    .build_many(&extra_sources)
                    .ok()
            })
            .flatten()
            .map(Arc::new);
        let re = if sources.is_empty() {
            None
        } else {
            let re = meta::Builder::new()
                .configure(meta::Config::new().hybrid_cache_capacity(8 << 20))
                .build_many(&sources)
                .map_err(|e| e.to_string())?;
            Some(Arc::new(re))
        };
        Ok(Self {
            re,
            extra: extra_dfa,
            patterns,
            classes,
        })
    }

    /// Where a stream scanner's hold for the configured patterns begins in `text` (not
    /// before `from`): the earliest position, within their longest match of the end,
    /// from which the text so far may still grow into one of their matches; `text.len()`
    /// when none may. `cache` is the caller's (made on first use).
    pub(crate) fn extra_hold(
        &self,
        text: &str,
        from: usize,
        cache: &mut Option<hybrid::dfa::Cache>,
    ) -> usize {
        let len = text.len();
        let fixed = self.classes.fixed;
        let Some(dfa) = &self.extra else {
            // Without the walk: their longest match less one byte.
            return len.saturating_sub(fixed.saturating_sub(1)).max(from);
        };
        let cache = cache.get_or_insert_with(|| dfa.create_cache());
        // A match as long as the longest may start `fixed` bytes back and still wait for
        // the byte after it (a `\b`).
        let start = len.saturating_sub(fixed).max(from);
        (start..len)
            .filter(|p| text.is_char_boundary(*p))
            .find(|p| may_grow(dfa, cache, text, *p))
            .unwrap_or(len)
    }

    /// Every finding in `text[from..]` (`text[..from]` is context for boundaries), in order,
    /// non-overlapping.
    pub fn find(&self, text: &str, from: usize) -> Vec<Finding> {
        let mut out = Vec::new();
        let Some(re) = &self.re else {
            return out;
        };
        // `search` takes a cache from the regex's own pool (the calling thread's, without
        // contention): the lazy DFA keeps the states it built for earlier texts. A fresh
        // cache per call rebuilt them every time (about 145 us per call, whatever its length).
        let mut at = from;
        while at < text.len() {
            let Some(m) = re.search(&Input::new(text).range(at..)) else {
                break;
            };
            let start = m.start();
            let mut found = self.confirm(text, m.pattern(), m.range());
            if found.is_none() {
                // Another pattern may match at the same place (e.g. a phone after a number
                // that failed its card check).
                for pid in m.pattern().as_usize() + 1..self.patterns.len() {
                    let Ok(pid) = PatternID::new(pid) else {
                        break;
                    };
                    let input = Input::new(text)
                        .range(start..)
                        .anchored(Anchored::Pattern(pid));
                    if let Some(m2) = re.search(&input)
                        && let Some(f) = self.confirm(text, pid, m2.range())
                    {
                        found = Some(f);
                        break;
                    }
                }
            }
            match found {
                Some(f) => {
                    at = f.range.end.max(start + 1);
                    out.push(f);
                }
                None => at = next_char(text, start),
            }
            at = at.max(m.end().min(start + 1).max(start + 1));
            while !text.is_char_boundary(at) {
                at += 1;
            }
        }
        out
    }

    fn confirm(&self, text: &str, pid: PatternID, range: Range<usize>) -> Option<Finding> {
        let info = self.patterns.get(pid.as_usize())?;
        let range = check(info.check, text, range)?;
        Some(Finding {
            entity: info.entity,
            range,
        })
    }
}

/// Whether `text[at..]` is the start of a possible match of `dfa` (anchored at `at`): the
/// walk over it to the end of the text does not die. Whatever the DFA cannot decide (a
/// full cache, a byte it gives up on) counts as may.
fn may_grow(dfa: &hybrid::dfa::DFA, cache: &mut hybrid::dfa::Cache, text: &str, at: usize) -> bool {
    let input = Input::new(text).range(at..).anchored(Anchored::Yes);
    let Ok(mut sid) = dfa.start_state_forward(cache, &input) else {
        return true;
    };
    for b in &text.as_bytes()[at..] {
        match dfa.next_state(cache, sid, *b) {
            Ok(next) if next.is_dead() => return false,
            Ok(next) if next.is_quit() => return true,
            Ok(next) => sid = next,
            Err(_) => return true,
        }
    }
    !sid.is_dead()
}

/// The longest match a configured pattern may have.
pub const MAX_PATTERN_BYTES: usize = 1024;

fn next_char(text: &str, at: usize) -> usize {
    text[at..]
        .chars()
        .next()
        .map_or(text.len(), |c| at + c.len_utf8())
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether the bytes around `range` are not word characters.
fn bounded(text: &str, range: &Range<usize>) -> bool {
    let b = text.as_bytes();
    let before = range.start.checked_sub(1).map(|i| b[i]);
    let after = b.get(range.end).copied();
    !before.is_some_and(is_word) && !after.is_some_and(is_word)
}

/// The PEM END line after a header, or the end of the text.
pub(crate) fn pem_end(text: &str, from: usize) -> Option<usize> {
    let rest = &text[from..];
    let end = rest.find("-----END ")?;
    let tail = &rest[end..];
    let close = tail.find("PRIVATE KEY-----")?;
    Some(from + end + close + "PRIVATE KEY-----".len())
}

fn check(check: Check, text: &str, range: Range<usize>) -> Option<Range<usize>> {
    let s = &text[range.clone()];
    let ok = match check {
        Check::None => true,
        // Random key bodies have digits; words joined by dashes do not.
        Check::Token => s.bytes().any(|b| b.is_ascii_digit()),
        Check::Pem => {
            let end = pem_end(text, range.end).unwrap_or(text.len());
            return Some(range.start..end);
        }
        Check::Card => bounded(text, &range) && card_ok(s),
        Check::Iban => return iban(text, range),
        Check::Ssn => bounded(text, &range) && ssn_ok(s),
        Check::PhoneIntl => {
            let before = range.start.checked_sub(1).map(|i| text.as_bytes()[i]);
            let digits = s.bytes().filter(u8::is_ascii_digit).count();
            !before.is_some_and(|b| is_word(b) || b == b'+')
                && (8..=15).contains(&digits)
                && !text.as_bytes().get(range.end).is_some_and(|b| is_word(*b))
        }
        Check::PhoneNanp => {
            let before = range.start.checked_sub(1).map(|i| text.as_bytes()[i]);
            let digits = s.bytes().filter(u8::is_ascii_digit).count();
            !before.is_some_and(|b| is_word(b) || b == b'+' || b == b'-' || b == b'.')
                && (digits == 10 || (digits == 11 && s.starts_with('1')))
                && !followed_by_number(text, range.end)
        }
        Check::Ipv4 => {
            bounded(text, &range)
                && !followed_by_number(text, range.end)
                && !preceded_by_number(text, range.start)
                && s.parse::<std::net::Ipv4Addr>().is_ok()
        }
        Check::Ipv6 => return ipv6(text, range),
    };
    ok.then_some(range)
}

/// `.5` or `-5` right after: the match is part of a longer number (a version, a date).
fn followed_by_number(text: &str, end: usize) -> bool {
    let b = text.as_bytes();
    matches!(b.get(end), Some(b'.' | b'-')) && b.get(end + 1).is_some_and(u8::is_ascii_digit)
}

fn preceded_by_number(text: &str, start: usize) -> bool {
    let b = text.as_bytes();
    start >= 2 && matches!(b[start - 1], b'.' | b'-') && b[start - 2].is_ascii_digit()
}

fn ipv6(text: &str, range: Range<usize>) -> Option<Range<usize>> {
    let mut end = range.end;
    let b = text.as_bytes();
    let before = range.start.checked_sub(1).map(|i| b[i]);
    if before.is_some_and(|c| is_word(c) || c == b':') {
        return None;
    }
    // A trailing single `:` is punctuation ("address fe80::1: down").
    if text[range.start..end].ends_with(':') && !text[range.start..end].ends_with("::") {
        end -= 1;
    }
    let s = &text[range.start..end];
    if b.get(end).is_some_and(|c| is_word(*c)) || !s.bytes().any(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<std::net::Ipv6Addr>()
        .is_ok()
        .then_some(range.start..end)
}

/// Luhn over the digits of `s`.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// The digits of `s` (their values) in a buffer on the stack, and how many there are;
/// `None` when there are more than `N`.
fn digits<const N: usize>(s: &str) -> Option<([u8; N], usize)> {
    let mut out = [0u8; N];
    let mut n = 0;
    for b in s.bytes().filter(u8::is_ascii_digit) {
        *out.get_mut(n)? = b - b'0';
        n += 1;
    }
    Some((out, n))
}

/// Whether the non-digits of `s` are all the same byte (or there are none).
fn one_separator(s: &str) -> bool {
    let mut seps = s.bytes().filter(|b| !b.is_ascii_digit());
    let first = seps.next();
    seps.all(|b| Some(b) == first)
}

fn card_ok(s: &str) -> bool {
    // The pattern allows at most 19 digits.
    let Some((buf, n)) = digits::<19>(s) else {
        return false;
    };
    let digits = &buf[..n];
    let prefix = |k: usize| {
        digits
            .iter()
            .take(k)
            .fold(0u32, |acc, d| acc * 10 + u32::from(*d))
    };
    let (p1, p2, p3, p4) = (prefix(1), prefix(2), prefix(3), prefix(4));
    let issuer = match p1 {
        4 => matches!(n, 13 | 16 | 19),
        5 => (51..=55).contains(&p2) && n == 16,
        2 => (2221..=2720).contains(&p4) && n == 16,
        3 => {
            ((p2 == 34 || p2 == 37) && n == 15)
                || ((3528..=3589).contains(&p4) && (16..=19).contains(&n))
                || (((300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39)
                    && (14..=19).contains(&n))
        }
        6 => {
            (p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 || p2 == 62)
                && (16..=19).contains(&n)
        }
        _ => false,
    };
    // Separators, when present, must be one kind.
    issuer && one_separator(s) && luhn(digits)
}

fn ssn_ok(s: &str) -> bool {
    let Some((buf, 9)) = digits::<9>(s) else {
        return false;
    };
    let d = buf.map(u32::from);
    if !one_separator(s) {
        return false;
    }
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    let number = area * 1_000_000 + group * 10_000 + serial;
    // Never issued: area 000, 666, 900-999; group 00; serial 0000; and the numbers made
    // public on wallet inserts and in advertising.
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && number != 78_051_120
        && number != 219_099_999
        && number != 123_456_789
}

/// IBAN length by country (the SWIFT IBAN registry).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BI", 27),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DJ", 27),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FK", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HN", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("LY", 25),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MN", 20),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NI", 28),
    ("NL", 18),
    ("NO", 15),
    ("OM", 23),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("RU", 33),
    ("SA", 24),
    ("SC", 31),
    ("SD", 18),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("SO", 23),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
    ("YE", 30),
];

/// The IBAN at the start of the candidate: the country's length of characters (spaces
/// skipped), a valid checksum, and no word character right after.
fn iban(text: &str, range: Range<usize>) -> Option<Range<usize>> {
    let s = &text[range.clone()];
    let len = IBAN_LENGTHS
        .iter()
        .find(|(c, _)| s.starts_with(c))
        .map(|(_, n)| *n)?;
    let mut chars = Vec::with_capacity(len);
    let mut end = range.start;
    for (i, b) in s.bytes().enumerate() {
        if chars.len() == len {
            break;
        }
        if b != b' ' {
            chars.push(b);
        }
        end = range.start + i + 1;
    }
    if chars.len() != len || text.as_bytes().get(end).is_some_and(|b| is_word(*b)) {
        return None;
    }
    if range.start > 0 && is_word(text.as_bytes()[range.start - 1]) {
        return None;
    }
    let mut rem = 0u32;
    for b in chars[4..].iter().chain(&chars[..4]) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return None,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    (rem == 1).then_some(range.start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector() -> Detector {
        let all: Vec<(Builtin, usize)> = Builtin::ALL
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, i))
            .collect();
        Detector::new(&all, &[]).unwrap()
    }

    /// The entity names found in `text`, with the matched text.
    fn found(text: &str) -> Vec<(&'static str, String)> {
        detector()
            .find(text, 0)
            .into_iter()
            .map(|f| (Builtin::ALL[f.entity].name(), text[f.range].to_owned()))
            .collect()
    }

    fn assert_table(kind: &str, positives: &[(&str, &str)], negatives: &[&str]) {
        for (text, matched) in positives {
            let got = found(text);
            assert!(
                got.iter().any(|(k, m)| *k == kind && m == matched),
                "{kind}: expected `{matched}` in {text:?}, found {got:?}"
            );
        }
        for text in negatives {
            let got = found(text);
            assert!(
                !got.iter().any(|(k, _)| *k == kind),
                "{kind}: expected nothing in {text:?}, found {got:?}"
            );
        }
    }

    #[test]
    fn emails() {
        assert_table(
            "email",
            &[
                ("mail jane.doe@example.com now", "jane.doe@example.com"),
                ("<a+tag@sub.example.co.uk>", "a+tag@sub.example.co.uk"),
                ("x_y-z@ex-ample.io.", "x_y-z@ex-ample.io"),
            ],
            &["user@localhost", "@example.com", "jane@", "a@b.c"],
        );
    }

    #[test]
    fn phones_and_look_alikes() {
        assert_table(
            "phone",
            &[
                ("call +1 415 555 0100 today", "+1 415 555 0100"),
                ("+44 20 7946 0958", "+44 20 7946 0958"),
                ("(415) 555-0100", "(415) 555-0100"),
                ("at 415-555-0100.", "415-555-0100"),
                ("1-800-555-0199", "1-800-555-0199"),
                ("+49 (30) 901820", "+49 (30) 901820"),
            ],
            &[
                "order 4155550100",       // no separators: an id, not a phone
                "123-456-7890",           // area code cannot start with 1
                "415-155-0100",           // exchange cannot start with 1
                "on 2024-01-15 at 10:30", // a date
                "version 1.2.3",          // a version
                "+123456",                // 6 digits: too short for E.164
                "+1234567890123456",      // 16 digits: too long for E.164
                "3+4567890123",           // arithmetic
                "415-555-01000",          // a longer number
                "ISBN 978-3-16-148410-0", // an ISBN
                "1.415.555.0100.2",       // part of a longer dotted number
                "id-415-555-0100",        // inside an identifier
            ],
        );
    }

    #[test]
    fn cards_with_luhn_and_issuer() {
        assert_table(
            "credit_card",
            &[
                ("visa 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
                ("4111-1111-1111-1111", "4111-1111-1111-1111"),
                ("mc 5555555555554444", "5555555555554444"),
                ("2223003122003222", "2223003122003222"),
                ("amex 378282246310005", "378282246310005"),
                ("disc 6011111111111117", "6011111111111117"),
                ("jcb 3530111333300000", "3530111333300000"),
                ("diners 30569309025904", "30569309025904"),
                ("4222222222222", "4222222222222"),
            ],
            &[
                "4111 1111 1111 1112",  // Luhn fails
                "1234567812345678",     // no issuer
                "4111-1111 1111-1111",  // mixed separators
                "x4111111111111111",    // inside a word
                "41111111111111110000", // 20 digits
                "5105105105105106",     // Luhn fails
                "0000000000000000",     // no issuer
            ],
        );
    }

    #[test]
    fn ibans_with_checksum_and_length() {
        assert_table(
            "iban",
            &[
                ("DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 00"),
                ("pay GB82WEST12345698765432 now", "GB82WEST12345698765432"),
                ("NL91ABNA0417164300", "NL91ABNA0417164300"),
                ("FR1420041010050500013M02606", "FR1420041010050500013M02606"),
                ("NO9386011117947", "NO9386011117947"),
                (
                    "DE89 3704 0044 0532 0130 00 IS MINE",
                    "DE89 3704 0044 0532 0130 00",
                ),
            ],
            &[
                "DE89 3704 0044 0532 0130 01", // checksum
                "GB82WEST1234569876543",       // one short for GB
                "GB82WEST123456987654321",     // one long for GB
                "XX89370400440532013000",      // no such country
                "de89370400440532013000",      // lowercase
            ],
        );
    }

    #[test]
    fn ssns_outside_invalid_ranges() {
        assert_table(
            "us_ssn",
            &[
                ("ssn 536-22-1234.", "536-22-1234"),
                ("536 22 1234", "536 22 1234"),
            ],
            &[
                "000-12-3456",
                "666-12-3456",
                "912-12-3456",
                "536-00-1234",
                "536-22-0000",
                "078-05-1120",
                "123-45-6789",
                "536-22-12345",
                "536-22 1234",
            ],
        );
    }

    #[test]
    fn ip_addresses() {
        assert_table(
            "ip_address",
            &[
                ("from 192.168.1.20.", "192.168.1.20"),
                ("10.0.0.1:8080", "10.0.0.1"),
                (
                    "host 2001:db8:85a3::8a2e:370:7334 up",
                    "2001:db8:85a3::8a2e:370:7334",
                ),
                ("lo ::1 ok", "::1"),
                ("fe80::1: down", "fe80::1"),
            ],
            &[
                "256.1.1.1",
                "1.2.3",
                "v1.2.3.4",
                "1.2.3.4.5",
                "12:30:45",
                "std::io::Result",
                "00:1A:2B:3C:4D:5E",
                "dead::beef",
            ],
        );
    }

    #[test]
    fn secrets() {
        let anthropic = format!("sk-ant-api03-{}", "aB3".repeat(30));
        let openai = "sk-proj-AbC123dEf456GhI789jKl012MnO345pQr678";
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY-----";
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_table(
            "secret",
            &[
                (&format!("key {anthropic} x"), &anthropic),
                (&format!("OPENAI_API_KEY={openai}"), openai),
                ("aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
                (
                    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                ),
                (
                    "github_pat_11ABCDEFG0123456789_abcdefghij",
                    "github_pat_11ABCDEFG0123456789_abcdefghij",
                ),
                (
                    "AIzaSyD-abcdefghijklmnopqrstuvwxyz01234",
                    "AIzaSyD-abcdefghijklmnopqrstuvwxyz01234",
                ),
                (
                    "xoxb-123456789012-abcdefABCDEF",
                    "xoxb-123456789012-abcdefABCDEF",
                ),
                (&format!("bearer {jwt}"), jwt),
                (&format!("{pem}\nrest"), pem),
                (
                    "-----BEGIN PRIVATE KEY-----\nMIIEv (cut)",
                    "-----BEGIN PRIVATE KEY-----\nMIIEv (cut)",
                ),
            ],
            &[
                "sk-learn-is-a-python-library-name",
                "task-abcdefghijklmnop1234567890",
                "AKIA1234",
                "-----BEGIN PUBLIC KEY-----",
                "eyJhbGciOi",
            ],
        );
        // Anthropic keys are not reported as OpenAI keys (one finding, the whole key).
        let f = detector().find(&anthropic, 0);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].range, 0..anthropic.len());
    }

    #[test]
    fn luhn_known_values() {
        assert!(luhn(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 3]));
        assert!(!luhn(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 4]));
    }

    #[test]
    fn configured_patterns_are_bounded() {
        let extra = |r: &str| Extra {
            entity: 0,
            regex: r.to_owned(),
        };
        let d = Detector::new(&[], &[extra("EMP-[0-9]{6}")]).unwrap();
        assert_eq!(d.classes.fixed, 10);
        assert_eq!(d.find("id EMP-123456 ok", 0)[0].range, 3..13);
        assert!(Detector::new(&[], &[extra("EMP-[0-9]+")]).is_err());
        assert!(Detector::new(&[], &[extra("a{0,3}")]).is_err());
        assert!(Detector::new(&[], &[extra("(")]).is_err());
    }

    #[test]
    fn non_ascii_text_is_scanned_on_char_boundaries() {
        let text = "Grüße an jane@example.com — 🙂 +49 30 901820";
        let got = found(text);
        assert_eq!(got[0], ("email", "jane@example.com".to_owned()));
        assert_eq!(got[1], ("phone", "+49 30 901820".to_owned()));
    }
}
