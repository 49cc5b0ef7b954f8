//! The library's files import each other without cycles: every `crate::…` path in `src/` (in `use` lists, grouped
//! or not, and inline) is resolved to the file of the longest module prefix it names, and the resulting file graph
//! must have no cycle. A cycle means two files are one concern, or a trait sits in the wrong place.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Module path (`["source", "session"]`) → file (`source/session.rs`), for every library file under `src/`.
fn modules(src: &Path) -> BTreeMap<Vec<String>, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src/") {
            let path = entry.expect("dir entry").path();
            let rel = path.strip_prefix(src).expect("under src/").to_path_buf();
            if path.is_dir() {
                // The binary's own modules are not part of the library.
                if rel != Path::new("bin") {
                    dirs.push(path);
                }
                continue;
            }
            let Some(stem) = rel.to_str().and_then(|s| s.strip_suffix(".rs")) else {
                continue;
            };
            let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            out.insert(parts, stem.to_owned() + ".rs");
        }
    }
    out
}

/// Source text without `//` comments (doc links are not imports).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits a brace group's body at its top-level commas.
fn top_level_items(body: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0usize);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(body[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(body[start..].trim());
    items.into_iter().filter(|s| !s.is_empty()).collect()
}

/// The paths of a `use` tree (`a::{b, c::{d}}` → `a::b`, `a::c::d`), under `prefix`.
fn expand(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let body = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let base = [prefix, &head].concat();
        for item in top_level_items(body) {
            expand(&base, item, out);
        }
    } else {
        let leaf = tree.split(" as ").next().unwrap_or(tree);
        let mut path = prefix.to_vec();
        path.extend(leaf.split("::").filter(|s| !s.is_empty()).map(str::to_owned));
        out.push(path);
    }
}

/// Every module path a file names after `crate::`.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue;
        }
        // The path runs to the end of its brace group, or to the first character that cannot be part of it.
        let mut depth = 0usize;
        let end = rest
            .char_indices()
            .find(|&(_, c)| match c {
                '{' => {
                    depth += 1;
                    false
                }
                '}' if depth > 0 => {
                    depth -= 1;
                    false
                }
                c if depth > 0 => c == ';',
                c => !(c.is_alphanumeric() || c == '_' || c == ':'),
            })
            .map_or(rest.len(), |(i, c)| if c == '}' { i + 1 } else { i });
        expand(&[], &rest[..end], &mut out);
    }
    out
}

/// The file → files graph of the library.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let mut graph = BTreeMap::new();
    for file in modules.values() {
        let text = std::fs::read_to_string(src.join(file)).expect("read a source file");
        let deps: BTreeSet<String> = crate_paths(&code(&text))
            .iter()
            .filter_map(|path| {
                (1..=path.len())
                    .rev()
                    .find_map(|n| modules.get(&path[..n]))
                    .filter(|target| *target != file)
                    .cloned()
            })
            .collect();
        graph.insert(file.clone(), deps);
    }
    graph
}

/// One cycle of the graph, if there is any (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_cycle_between_files() {
    let src: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    assert!(
        graph.len() > 20,
        "found only {} files under {}",
        graph.len(),
        src.display()
    );
    assert!(
        graph["vm_state.rs"].contains("devices/net.rs")
            && graph["source/precopy.rs"].contains("source/session.rs"),
        "the import graph misses known edges: {graph:#?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn paths_are_read_from_grouped_and_inline_uses() {
    let text = "use crate::{a::{b::C, d}, e as f};\nfn x() { crate::g::h(); } // crate::ignored\n";
    let paths = crate_paths(&code(text));
    let text_paths: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(text_paths, ["a::b::C", "a::d", "e", "g::h"]);
    let mut g = BTreeMap::new();
    g.insert("a.rs".to_owned(), BTreeSet::from(["b.rs".to_owned()]));
    g.insert("b.rs".to_owned(), BTreeSet::from(["a.rs".to_owned()]));
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a.rs".into(), "b.rs".into(), "a.rs".into()])
    );
}
