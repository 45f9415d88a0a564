//! llm-gateway: a gRPC gateway that gives every team one typed API to many LLM providers,
//! and takes over routing, retries, failover, tail latency, deadlines and cost accounting.
//!
//! # Layout
//!
//! - [`server`]: the tonic server: handlers, pb conversion, layers, startup and shutdown;
//!   the shared call engine (`server::engine`); the OpenAI- and Anthropic-compatible HTTP
//!   front (`server::http`); the front door's connection limits (`server::conn`);
//!   [`server::settings`] holds its own config sections (`[server]`, `[admin]`,
//!   `[connections]`).
//! - [`reload`]: reloading provider keys and certificates without a restart (SIGHUP,
//!   `ReloadConfig`), and what a reload reports as needing a restart.
//! - [`config`]: loads the TOML file, interpolates `${VAR}`, applies overrides, assembles the
//!   sections into [`config::Config`], checks cross-section rules, discovers zero-config
//!   providers.
//! - [`batch`]: batch jobs: durable jobs of many chat requests, run through the call
//!   engine (behind its [`batch::Execute`] trait) with bounded concurrency, retries and a
//!   deadline; its own storage trait with SQLite and PostgreSQL tables; `[batch]`.
//! - [`rollout`]: canary rollouts of staged policy updates: the rollout document, the
//!   per-replica sequential test ([`rollout::stats`]) and the driver that advances steps
//!   and rolls back.
//! - [`store`]: durable state (policies, keys, usage) behind a trait; SQLite by default,
//!   PostgreSQL shared by several replicas (`store.url`) with a change feed.
//! - [`auth`]: gateway API keys: issuing, hashing, verifying, scopes.
//! - [`executor`]: deadlines, fallback, hedging, the stream commit point, cancellation.
//! - [`limits`]: rate limits and budgets per key and per team.
//! - [`guard`]: guardrails: PII and secret detectors, block / redact / mask / tokenize,
//!   the streaming-safe reply scanner, and the `[guardrails.*]` profiles.
//! - [`experiments`]: shadow traffic and A/B experiments: the deterministic arm assignment,
//!   the shadow reply comparison, GetExperiment's statistics, and the bounded shadow pool
//!   (`experiments::shadow`, which runs calls on the executor); the policy blocks are
//!   [`routing::experiment`].
//! - [`cache`]: the response cache (exact and semantic), always within the caller's
//!   tenant namespace; `[cache]` and a policy's `cache` block.
//! - [`routing`]: the policy model and selection: from the caller's `model` to a
//!   [`routing::Plan`].
//! - [`error`]: [`error::GatewayError`] and its single mapping to gRPC statuses.
//! - [`health`]: circuit breakers, rate-limit cooldowns, latency statistics per target.
//! - [`ledger`]: the usage and cost ledger, writing to a [`ledger::UsageSink`].
//! - [`audit`]: the audit log of admin changes (who, what, before/after etag), written to an
//!   [`audit::AuditSink`] the store implements; `[audit]`.
//! - [`pacing`]: outbound smoothing: each provider account's requests and tokens per
//!   minute (configured, and learned from the providers' headers) and the adaptive
//!   concurrency limit per target; `[pacing]`.
//! - [`shared`]: state shared by several replicas in Redis (`[shared]`): the client, its
//!   fail-open/fail-closed mode, and provider rest state published to every replica.
//! - [`providers`]: the [`providers::Provider`] trait and the provider kit: a wire format
//!   per provider API (one file each), one HTTP adapter, pluggable auth and stream framing,
//!   the kind registry that owns `[providers.*]` settings, the one error policy, provider
//!   keys and `[upstream]`.
//! - [`models`]: the model registry (context windows, prices) and cost computation.
//! - [`telemetry`]: logging, metric names, trace context; `[log]` and `[metrics]`.
//! - [`tls`]: TLS and mutual TLS for the gRPC listeners, with certificate reload.
//! - [`mock_upstream`]: an HTTP server speaking provider wire formats with scripted faults,
//!   used by tests, benchmarks and the `llm-gateway-mock` binary.
//! - [`pb`]: generated protobuf/gRPC code and the reflection descriptor set.
//! - [`codec`]: the generated services' protobuf codec (an undecodable message is the
//!   caller's fault: INVALID_ARGUMENT).
//! - [`settings`]: what every config section is made of (field-named problems, durations).
//! - [`types`]: provider-neutral requests, messages, answers, stream events, usage, routes.
//!
//! Each config section belongs to the module it configures: a `Raw*` serde struct as
//! written (`deny_unknown_fields`) and a validated settings type with its defaults and a
//! `from_raw(raw, &mut settings::Issues)` that names the field of each problem.
//!
//! # Dependencies
//!
//! Each row uses only rows below it, never its own row or one above (test code included
//! only outside `#[cfg(test)]` modules). The unit test `layering` in this file reads every
//! `crate::` and `super::` path in `src/` and fails on a use that goes up or sideways,
//! naming the file and the path; it also checks that this diagram and the list above name
//! every module.
//!
//! ```text
//! server
//! reload
//! config
//! batch rollout
//! store experiments::shadow
//! auth executor
//! limits routing guard
//! cache experiments
//! error mock_upstream
//! health ledger providers audit
//! pacing
//! shared
//! models server::settings telemetry tls
//! pb settings types
//! codec
//! ```
//!
//! So `server -> executor -> {routing, providers, health} -> types`; `config` assembles the
//! sections of the modules below it and only `server` and `reload` see a whole `Config`;
//! the ledger defines the sink the store implements.

pub mod audit;
pub mod auth;
pub mod batch;
pub mod cache;
pub mod codec;
pub mod config;
pub mod error;
pub mod executor;
pub mod experiments;
pub mod guard;
pub mod health;
pub mod ledger;
pub mod limits;
pub mod mock_upstream;
pub mod models;
pub mod pacing;
pub mod pb;
#[cfg(test)]
mod props;
pub mod providers;
pub mod reload;
pub mod rollout;
pub mod routing;
pub mod server;
pub mod settings;
pub mod shared;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod types;

#[cfg(test)]
mod layering {
    //! Keeps the "# Dependencies" diagram of the crate docs true (see there).

    use std::{
        collections::BTreeMap,
        path::{Path, PathBuf},
    };

    /// A use of another module: where, and the path as written.
    #[derive(Debug)]
    struct Use {
        file: PathBuf,
        path: String,
    }

    fn src() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
    }

    fn lib_rs() -> String {
        std::fs::read_to_string(src().join("lib.rs")).unwrap()
    }

    /// The rows of the diagram in the crate docs, top first.
    fn rows(lib: &str) -> Vec<Vec<String>> {
        let docs: Vec<&str> = lib
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(str::trim)
            .collect();
        let start = docs.iter().position(|l| *l == "# Dependencies").unwrap();
        let open = start + docs[start..].iter().position(|l| *l == "```text").unwrap();
        docs[open + 1..]
            .iter()
            .take_while(|l| **l != "```")
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// The top-level modules declared in lib.rs (`pub mod x;`), test-only ones left out.
    fn modules(lib: &str) -> Vec<String> {
        let lines: Vec<&str> = lib.lines().map(str::trim).collect();
        lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || lines[i - 1] != "#[cfg(test)]")
            .filter_map(|(_, l)| {
                l.strip_prefix("pub mod ")
                    .or_else(|| l.strip_prefix("mod "))
            })
            .filter_map(|l| l.strip_suffix(';'))
            .map(str::to_owned)
            .collect()
    }

    /// Blanks out comments, string and char literals (keeping the length and newlines).
    fn code_only(text: &str) -> Vec<u8> {
        let s = text.as_bytes();
        let mut out = s.to_vec();
        let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
            for b in &mut out[from..to.min(s.len())] {
                if *b != b'\n' {
                    *b = b' ';
                }
            }
        };
        let mut i = 0;
        while i < s.len() {
            let rest = &s[i..];
            if rest.starts_with(b"//") {
                let end = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(s.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            } else if rest.starts_with(b"/*") {
                let (mut depth, mut j) = (1, i + 2);
                while j < s.len() && depth > 0 {
                    if s[j..].starts_with(b"/*") {
                        depth += 1;
                        j += 1;
                    } else if s[j..].starts_with(b"*/") {
                        depth -= 1;
                        j += 1;
                    }
                    j += 1;
                }
                blank(&mut out, i, j);
                i = j;
            } else if rest.starts_with(b"r#") || rest.starts_with(b"r\"") {
                let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
                if rest.get(1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                let body = i + 2 + hashes;
                let end = s[body..]
                    .windows(close.len())
                    .position(|w| w == close.as_slice())
                    .map_or(s.len(), |n| body + n + close.len());
                blank(&mut out, i, end);
                i = end;
            } else if rest[0] == b'"' {
                let mut j = i + 1;
                while j < s.len() && s[j] != b'"' {
                    j += if s[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            } else if rest[0] == b'\'' {
                // A char literal ('a', '\n', '\u{1F600}'), or a lifetime ('a).
                let end = if rest.get(1) == Some(&b'\\') {
                    rest[2..]
                        .iter()
                        .position(|&b| b == b'\'')
                        .map(|n| i + n + 3)
                } else {
                    let len = std::str::from_utf8(&rest[1..])
                        .ok()
                        .and_then(|r| r.chars().next())
                        .map_or(1, char::len_utf8);
                    (rest.get(1 + len) == Some(&b'\'')).then_some(i + len + 2)
                };
                match end {
                    Some(end) => {
                        blank(&mut out, i, end);
                        i = end;
                    }
                    None => i += 1,
                }
            } else {
                i += 1;
            }
        }
        out
    }

    fn is_ident(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'_'
    }

    fn skip_ws(s: &[u8], i: &mut usize) {
        while *i < s.len() && s[*i].is_ascii_whitespace() {
            *i += 1;
        }
    }

    /// Reads a use tree (`a::b`, `a::{b, c::d}`, `a::*`) at `i`, pushing each full path.
    fn tree(s: &[u8], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        skip_ws(s, i);
        if s.get(*i) == Some(&b'{') {
            *i += 1;
            loop {
                skip_ws(s, i);
                match s.get(*i) {
                    None => return,
                    Some(b'}') => {
                        *i += 1;
                        return;
                    }
                    Some(b',') => *i += 1,
                    Some(_) => {
                        let before = *i;
                        tree(s, i, prefix, out);
                        if *i == before {
                            *i += 1;
                        }
                    }
                }
            }
        }
        let start = *i;
        while *i < s.len() && is_ident(s[*i]) {
            *i += 1;
        }
        if *i == start {
            out.push(prefix.to_vec());
            return;
        }
        let mut path = prefix.to_vec();
        path.push(String::from_utf8_lossy(&s[start..*i]).into_owned());
        let mut j = *i;
        skip_ws(s, &mut j);
        if s[j..].starts_with(b"::") {
            *i = j + 2;
            tree(s, i, &path, out);
        } else {
            out.push(path);
        }
    }

    /// Byte ranges of `#[cfg(test)] mod name { ... }` blocks, and the names of
    /// `#[cfg(test)] mod name;` files.
    fn test_modules(code: &[u8]) -> (Vec<(usize, usize)>, Vec<String>) {
        let (mut blocks, mut files) = (Vec::new(), Vec::new());
        let marker = b"#[cfg(test)]";
        let mut from = 0;
        while let Some(n) = code[from..].windows(marker.len()).position(|w| w == marker) {
            let mut i = from + n + marker.len();
            from = i;
            skip_ws(code, &mut i);
            // A visibility: `pub`, `pub(crate)`, `pub(super)`, ...
            if code[i..].starts_with(b"pub") {
                i += 3;
                if code.get(i) == Some(&b'(') {
                    i += code[i..]
                        .iter()
                        .position(|&b| b == b')')
                        .map_or(0, |n| n + 1);
                }
                skip_ws(code, &mut i);
            }
            if !code[i..].starts_with(b"mod ") {
                continue;
            }
            i += 4;
            skip_ws(code, &mut i);
            let name_start = i;
            while i < code.len() && is_ident(code[i]) {
                i += 1;
            }
            let name = String::from_utf8_lossy(&code[name_start..i]).into_owned();
            skip_ws(code, &mut i);
            match code.get(i) {
                Some(b';') => files.push(name),
                Some(b'{') => {
                    let (mut depth, mut j) = (0usize, i);
                    while j < code.len() {
                        match code[j] {
                            b'{' => depth += 1,
                            b'}' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                    blocks.push((i, j));
                }
                _ => {}
            }
        }
        (blocks, files)
    }

    /// The node a module path belongs to: a row entry such as `server::settings`, or the
    /// top-level module.
    fn node(path: &[String], nodes: &[String]) -> Option<String> {
        let first = path.first()?;
        if let Some(second) = path.get(1) {
            let split = format!("{first}::{second}");
            if nodes.contains(&split) {
                return Some(split);
            }
        }
        nodes.contains(first).then(|| first.clone())
    }

    /// Every use of another node, by node, from the non-test code of `file` (module path
    /// `module`) and the files of its child modules.
    fn scan(
        file: &Path,
        module: &[String],
        nodes: &[String],
        uses: &mut BTreeMap<String, Vec<(String, Use)>>,
    ) {
        let text = std::fs::read_to_string(file).unwrap();
        let mut code = code_only(&text);
        let (blocks, test_files) = test_modules(&code);
        for (from, to) in blocks {
            code[from..to].fill(b' ');
        }
        let Some(me) = node(module, nodes) else {
            return;
        };
        let mut i = 0;
        while i < code.len() {
            let boundary = i == 0 || !(is_ident(code[i - 1]) || code[i - 1] == b':');
            let (base, skip): (Vec<String>, usize) = if !boundary {
                (Vec::new(), 0)
            } else if code[i..].starts_with(b"crate::") {
                (Vec::new(), 7)
            } else if code[i..].starts_with(b"super::") {
                // A file's `super` is its parent module (inline modules are rare enough
                // outside tests that a miss there is acceptable).
                let mut up = module.len().saturating_sub(1);
                let mut j = i + 7;
                while code[j..].starts_with(b"super::") {
                    up = up.saturating_sub(1);
                    j += 7;
                }
                (module[..up].to_vec(), j - i)
            } else {
                (Vec::new(), 0)
            };
            if skip == 0 {
                i += 1;
                continue;
            }
            let written_start = i;
            i += skip;
            let mut paths = Vec::new();
            tree(&code, &mut i, &base, &mut paths);
            let written = String::from_utf8_lossy(&code[written_start..i])
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            for path in paths {
                if let Some(target) = node(&path, nodes)
                    && target != me
                {
                    uses.entry(me.clone()).or_default().push((
                        target,
                        Use {
                            file: file
                                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                                .unwrap_or(file)
                                .to_owned(),
                            path: written.clone(),
                        },
                    ));
                }
            }
        }
        // Child modules declared in this file live beside it (x.rs -> x/, mod.rs -> ./).
        let dir = match file.file_name().and_then(|n| n.to_str()) {
            Some("mod.rs" | "lib.rs") => file.parent().unwrap().to_owned(),
            _ => file.with_extension(""),
        };
        let children = text
            .lines()
            .map(str::trim)
            .filter_map(|l| {
                l.strip_prefix("pub mod ")
                    .or_else(|| l.strip_prefix("pub(crate) mod "))
                    .or_else(|| l.strip_prefix("mod "))
            })
            .filter_map(|l| l.strip_suffix(';'))
            .filter(|name| !test_files.iter().any(|t| t == name));
        for child in children {
            let mut path = module.to_vec();
            path.push(child.to_owned());
            for candidate in [
                dir.join(format!("{child}.rs")),
                dir.join(child).join("mod.rs"),
            ] {
                if candidate.exists() {
                    scan(&candidate, &path, nodes, uses);
                }
            }
        }
    }

    #[test]
    fn every_module_is_in_the_layout_and_the_diagram() {
        let lib = lib_rs();
        let rows = rows(&lib);
        let in_rows: Vec<&String> = rows.iter().flatten().collect();
        let layout: String = lib
            .lines()
            .skip_while(|l| *l != "//! # Layout")
            .take_while(|l| *l != "//! # Dependencies")
            .collect();
        for module in modules(&lib) {
            assert!(
                in_rows.contains(&&module),
                "module `{module}` is missing from the diagram under # Dependencies in src/lib.rs"
            );
            assert!(
                layout.contains(&format!("- [`{module}`]")),
                "module `{module}` is missing from the # Layout list in src/lib.rs"
            );
        }
        let mut seen = Vec::new();
        for entry in in_rows {
            let top = entry.split("::").next().unwrap_or(entry).to_owned();
            assert!(
                modules(&lib).contains(&top),
                "`{entry}` in the diagram is not a module of the crate"
            );
            assert!(!seen.contains(entry), "`{entry}` is in the diagram twice");
            seen.push(entry.clone());
        }
    }

    #[test]
    fn every_use_points_down_the_diagram() {
        let lib = lib_rs();
        let rows = rows(&lib);
        let rank: BTreeMap<&String, usize> = rows
            .iter()
            .enumerate()
            .flat_map(|(r, row)| row.iter().map(move |n| (n, r)))
            .collect();
        let nodes: Vec<String> = rank.keys().map(|n| (*n).clone()).collect();
        let mut uses = BTreeMap::new();
        for module in modules(&lib) {
            let path = vec![module.clone()];
            for file in [
                src().join(format!("{module}.rs")),
                src().join(&module).join("mod.rs"),
            ] {
                if file.exists() {
                    scan(&file, &path, &nodes, &mut uses);
                }
            }
        }
        assert!(
            uses.get("server").is_some_and(|u| !u.is_empty()),
            "the scan found no use at all: {uses:?}"
        );
        let mut wrong = Vec::new();
        for (from, list) in &uses {
            for (to, at) in list {
                if rank[to] <= rank[from] {
                    wrong.push(format!(
                        "`{from}` uses `{to}` ({}: `{}`), but `{to}` is not below `{from}`",
                        at.file.display(),
                        at.path
                    ));
                }
            }
        }
        wrong.sort();
        wrong.dedup();
        assert!(
            wrong.is_empty(),
            "uses against the diagram under # Dependencies in src/lib.rs:\n  {}",
            wrong.join("\n  ")
        );
    }

    #[test]
    fn the_scanner_reads_use_trees_and_skips_comments_strings_and_tests() {
        let code = code_only(
            "use crate::{a::{b, c::D}, e}; // crate::f\nlet s = \"crate::g\"; let c = '\"'; crate::h::i();\n#[cfg(test)]\nmod tests { use crate::j; }\n#[cfg(test)]\npub(crate) mod more { use crate::k; }\n",
        );
        let (blocks, _) = test_modules(&code);
        assert_eq!(blocks.len(), 2);
        let text = String::from_utf8(code[..blocks[0].0].to_vec()).unwrap();
        let mut found = Vec::new();
        let mut from = 0;
        while let Some(n) = text[from..].find("crate::") {
            let mut i = from + n + 7;
            tree(text.as_bytes(), &mut i, &[], &mut found);
            from = i;
        }
        let found: Vec<String> = found.iter().map(|p| p.join("::")).collect();
        assert_eq!(found, ["a::b", "a::c::D", "e", "h::i"]);
    }
}
