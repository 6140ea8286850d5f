//! The node's modules form layers: no module imports one that imports it
//! back, directly or around a circle (issue 19). Shared types (settings,
//! events, counters) live low enough for every layer to use them. Reads
//! every `crate::<module>` path in each module's sources (doc comments
//! excluded) and fails on any cycle, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module of a source file under `src/`.
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    first
        .unwrap_or_default()
        .trim_end_matches(".rs")
        .to_string()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src").flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn modules_import_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut modules = BTreeSet::new();
    for f in &files {
        modules.insert(module_of(f.strip_prefix(&src).expect("under src")));
    }
    // What the crate root re-exports, by the module it comes from.
    let root: BTreeMap<&str, &str> = [
        ("Event", "events"),
        ("Origin", "events"),
        ("Error", "error"),
        ("Result", "error"),
    ]
    .into();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = module_of(f.strip_prefix(&src).expect("under src"));
        if m == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("read source");
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let target = if modules.contains(&name) {
                    name
                } else if let Some(t) = root.get(name.as_str()) {
                    t.to_string()
                } else {
                    continue;
                };
                if target != m {
                    deps.entry(m.clone()).or_default().insert(target);
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.to_string());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in deps.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, deps, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        if let Some(circle) = visit(m, &deps, &mut Vec::new(), &mut done) {
            panic!("modules import each other: {}", circle.join(" -> "));
        }
    }
    // The layers, as found (printed with --nocapture).
    for (m, d) in &deps {
        println!(
            "{m} -> {}",
            d.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
}
