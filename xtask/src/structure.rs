//! The agent's module structure, checked: no import cycles between the top-level modules of
//! `apiban-user/src`, and none importing a module above it in [`LAYERS`]. A module that needs a type or helper another layer also uses takes it
//! from below both (see ARCHITECTURE.md); a cycle means one of them reached up. Run as a unit
//! test, so `cargo xtask test` fails on a new cycle, naming the files that make it.
//!
//! It reads the source as text: every `crate::<module>` path outside comments and test
//! modules, `use crate::{a::.., b}` groups included. Doc links are comments, and so are free.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Module -> the modules it uses -> the files (relative to the crate's src) that do.
pub type Imports = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// The imports between the top-level modules of the crate whose source is in `src`.
pub fn imports(src: &Path) -> std::io::Result<Imports> {
    let modules: BTreeSet<String> = modules(src)?.into_iter().collect();
    let mut imports = Imports::new();
    for file in rust_files(src)? {
        let rel = file
            .strip_prefix(src)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        let top = rel.split('/').next().unwrap_or_default();
        let top = top.strip_suffix(".rs").unwrap_or(top).to_owned();
        if !modules.contains(&top) || is_test_file(&rel) {
            continue;
        }
        let text = std::fs::read_to_string(&file)?;
        for used in used_modules(&without_tests(&without_comments(&text))) {
            if used != top && modules.contains(&used) {
                imports
                    .entry(top.clone())
                    .or_default()
                    .entry(used)
                    .or_default()
                    .insert(rel.clone());
            }
        }
    }
    Ok(imports)
}

fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(files)
}

fn is_test_file(rel: &str) -> bool {
    rel.ends_with("/tests.rs") || rel.contains("/tests/")
}

/// The text with `//` comments removed (doc comments included); string literals are not
/// told apart, which only matters for a `//` inside one, where it cuts a line short.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text before its inline test module (`#[cfg(test)]` then `mod tests {`), which by
/// this crate's convention comes last. A test module in a file of its own (`mod tests;`) is
/// only a declaration: the text after it is read on.
fn without_tests(text: &str) -> String {
    let mut rest = text;
    while let Some(i) = rest.find("#[cfg(test)]") {
        let after = rest[i + "#[cfg(test)]".len()..].trim_start();
        if let Some(module) = after.strip_prefix("mod ") {
            let inline = module
                .find(['{', ';'])
                .is_some_and(|end| module.as_bytes()[end] == b'{');
            if inline {
                return text[..text.len() - rest.len() + i].to_owned();
            }
        }
        rest = &rest[i + 1..];
    }
    text.to_owned()
}

/// The first segment of every `crate::` path: `crate::a::B` and `crate::{a::B, b}` give a
/// and b.
fn used_modules(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let preceded_by_ident = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[i + "crate::".len()..];
        if preceded_by_ident {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            used.extend(group_heads(group));
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                used.insert(name.to_owned());
            }
        }
    }
    used
}

/// The first identifier of each top-level item of the `{...}` group that `group` starts
/// inside of.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let (mut depth, mut at_item_start) = (0usize, true);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item_start = true,
            c if at_item_start && (c.is_alphanumeric() || c == '_') => {
                heads.push(ident(&group[i..]).to_owned());
                at_item_start = false;
            }
            _ => {}
        }
    }
    heads
}

fn ident(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The agent's modules, lowest first: a module imports only modules before it. ARCHITECTURE.md's
/// code map follows this order. A new module takes its place here; the test fails until it
/// does.
pub const LAYERS: [&str; 27] = [
    // Helpers that import nothing of the crate.
    "clock",
    "human",
    "client_rate",
    "conn_slots",
    "notify",
    "proven_view",
    "sanitise",
    "dataplane",
    "source",
    "capture_client",
    // The ledger and what decides what enters it.
    "rate_budget",
    "ledger",
    "trust",
    "state",
    "engine",
    "snapshot",
    // The fleet, the owner and the servers that send it changes.
    "cluster",
    "sync",
    "host_addresses",
    "ban_api",
    "capture",
    // Settings for all of the above, resolved from flags and the file.
    "config",
    "detect",
    // Readers, the control socket, and the agent that wires everything.
    "status",
    "metrics",
    "control",
    "agent",
];

/// Every import from a module to one at or above it in [`LAYERS`], and every module that
/// [`LAYERS`] does not place: (module, what it imports or "", the files).
pub fn upward(imports: &Imports, modules: &[String]) -> Vec<(String, String, Vec<String>)> {
    let layer = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut found = Vec::new();
    for m in modules {
        if layer(m).is_none() {
            found.push((m.clone(), String::new(), Vec::new()));
        }
    }
    for (a, used) in imports {
        for (b, files) in used {
            if let (Some(la), Some(lb)) = (layer(a), layer(b))
                && lb >= la
            {
                found.push((a.clone(), b.clone(), files.iter().cloned().collect()));
            }
        }
    }
    found
}

/// The top-level modules of the crate whose source is in `src`.
pub fn modules(src: &Path) -> std::io::Result<Vec<String>> {
    let mut modules = Vec::new();
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        match name.strip_suffix(".rs") {
            Some("lib" | "main") => {}
            Some(module) => modules.push(module.to_owned()),
            None if entry.path().is_dir() => modules.push(name),
            None => {}
        }
    }
    modules.sort();
    Ok(modules)
}

/// The strongly connected components of more than one module: each an import cycle.
pub fn cycles(imports: &Imports) -> Vec<BTreeSet<String>> {
    // Tarjan's algorithm; the graph is a few dozen nodes.
    struct State<'a> {
        imports: &'a Imports,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.imports.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        imports,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in imports.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_modules_import_each_other_without_a_cycle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../apiban-user/src");
        let imports = imports(&src).expect("read apiban-user/src");
        assert!(
            imports.len() > 10,
            "the reader found too few modules: {imports:?}"
        );
        let found = cycles(&imports);
        let explain = |cycle: &BTreeSet<String>| {
            let mut lines = Vec::new();
            for a in cycle {
                for (b, files) in &imports[a] {
                    if cycle.contains(b) {
                        lines.push(format!("  {a} -> {b}: {files:?}"));
                    }
                }
            }
            lines.join("\n")
        };
        assert!(
            found.is_empty(),
            "import cycles between apiban-user's modules (move what both use below both):\n{}",
            found.iter().map(explain).collect::<Vec<_>>().join("\n\n")
        );
    }

    #[test]
    fn every_module_imports_only_modules_below_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../apiban-user/src");
        let imports = imports(&src).expect("read apiban-user/src");
        let modules = modules(&src).expect("read apiban-user/src");
        let found = upward(&imports, &modules);
        let explain = |(a, b, files): &(String, String, Vec<String>)| {
            if b.is_empty() {
                format!("  {a} has no place in structure::LAYERS: put it above what it imports")
            } else {
                format!("  {a} -> {b}, which is not below it: {files:?}")
            }
        };
        assert!(
            found.is_empty(),
            "apiban-user's layering is broken (move what both use below both, see \
             ARCHITECTURE.md):\n{}",
            found.iter().map(explain).collect::<Vec<_>>().join("\n")
        );
    }

    #[test]
    fn an_upward_import_and_an_unplaced_module_are_found() {
        let mut imports = Imports::new();
        imports
            .entry("ledger".into())
            .or_default()
            .entry("engine".into())
            .or_default()
            .insert("ledger/mod.rs".into());
        imports
            .entry("engine".into())
            .or_default()
            .entry("ledger".into())
            .or_default()
            .insert("engine/mod.rs".into());
        let modules = ["engine", "ledger", "newcomer"].map(String::from);
        let found = upward(&imports, &modules);
        assert_eq!(
            found,
            [
                ("newcomer".into(), String::new(), Vec::new()),
                (
                    "ledger".into(),
                    "engine".into(),
                    vec!["ledger/mod.rs".into()]
                ),
            ]
        );
    }

    #[test]
    fn paths_groups_comments_and_tests_are_read_as_meant() {
        let text = "use crate::{a::X, b, c::{D, e::F}};\n\
                    fn f() { crate::d::g(); my_crate::h::i(); }\n\
                    // crate::commented::Out\n\
                    /// [`crate::doclink`]\n\
                    #[cfg(test)]\nmod tests_in_a_file;\n\
                    use crate::e::after_the_declaration;\n\
                    #[cfg(test)]\nmod tests { use crate::only_tests; }\n";
        let used = used_modules(&without_tests(&without_comments(text)));
        let used: Vec<&str> = used.iter().map(String::as_str).collect();
        assert_eq!(used, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_cycle_is_found_and_a_chain_is_not() {
        let edge = |imports: &mut Imports, a: &str, b: &str| {
            imports
                .entry(a.into())
                .or_default()
                .entry(b.into())
                .or_default()
                .insert(format!("{a}.rs"));
        };
        let mut imports = Imports::new();
        edge(&mut imports, "agent", "sync");
        edge(&mut imports, "sync", "engine");
        edge(&mut imports, "engine", "ledger");
        assert!(cycles(&imports).is_empty());
        edge(&mut imports, "ledger", "sync");
        let found = cycles(&imports);
        assert_eq!(found.len(), 1);
        let members: Vec<&str> = found[0].iter().map(String::as_str).collect();
        assert_eq!(members, ["engine", "ledger", "sync"]);
    }
}
