//! The code's layering cannot silently rot (not an end-to-end test: it reads
//! `src/`). Modules form one order, from the plain data up to the command
//! line; a module may name only modules below it (`crate::X`), never one
//! above, so there is no import cycle between modules. ARCHITECTURE.md
//! explains each layer.

use super::harness::repo;

/// From the bottom up. A module may use the modules listed before it.
const LAYERS: &[&str] = &[
    "units",
    "crashpoint",
    "protocol",
    "records",
    "metrics",
    "runtime",
    "gateway",
    "spec",
    "analysis",
    "strategy",
    "store",
    "registry",
    "controller",
    "dashboard",
    "api",
    "grpc",
    "server",
    "cli",
];

/// The top-level module a source file belongs to (`src/gateway/pool.rs` →
/// `gateway`), or None for `lib.rs` and `main.rs`.
fn module_of(path: &std::path::Path) -> Option<String> {
    let rel = path.strip_prefix(repo().join("src")).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::NAME` a line of code names (comments left out).
fn named_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
        rest = after;
    }
    out
}

#[test]
fn no_module_names_a_module_above_it() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut files = Vec::new();
    sources(&repo().join("src"), &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some(own) = rank(&module) else {
            wrong.push(format!(
                "{}: module `{module}` is in no layer: add it to LAYERS here and to ARCHITECTURE.md",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for named in named_modules(line) {
                // `$crate::store_contract!` and the like: macros, not modules.
                let Some(theirs) = rank(&named) else { continue };
                if theirs > own {
                    wrong.push(format!(
                        "{}:{}: `{module}` names `{named}`, a layer above it",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the layering is broken:\n{}",
        wrong.join("\n")
    );
    assert!(files.len() > 50, "the sources were found");
}

#[test]
fn the_api_holds_no_store_handle() {
    let mut files = Vec::new();
    sources(&repo().join("src/api"), &mut files);
    files.push(repo().join("src/api.rs"));
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.contains(".store()"),
                "{}:{}: the api reads through the controller and registry, not the store: {line}",
                file.display(),
                n + 1
            );
        }
    }
}

#[test]
fn the_layer_test_sees_a_violation() {
    assert_eq!(
        named_modules("use crate::controller::Controller; // crate::api"),
        ["controller"]
    );
    assert_eq!(
        named_modules("let x = crate::records::check_name(crate::units::now());"),
        ["records", "units"]
    );
}
