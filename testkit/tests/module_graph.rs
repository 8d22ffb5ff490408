//! Every crate's module graph is acyclic (issue 16): a cycle means two modules can
//! only be understood, tested and changed together, so it is refused here, in the
//! ordinary test run, rather than in review.
//!
//! **What is checked.** Each workspace member (read from the root `Cargo.toml`, so
//! new crates are covered without touching this file) has its crate roots in `src/`
//! (`lib.rs`, `main.rs`, `bin/*.rs`, `bin/*/main.rs`). From each root the module tree
//! is followed through `mod x;` declarations, and every module file is parsed with
//! `syn`.
//!
//! **What an edge is.** A node is a module *file*; inline modules (`mod tests { … }`)
//! belong to the file they are written in, so a `#[cfg(test)] mod tests` using
//! `super::*` is part of its parent, not an edge. There is an edge from M to N when
//! M's code names an item through N's module path: a `use` or any path in code,
//! types, patterns or macro arguments that starts with `crate::`, `self::`,
//! `super::` (resolved against the inline module it is written in) or the name of a
//! child module in scope. N is the deepest module on that path that exists, so
//! `crate::a::b::Item` is an edge to `a/b.rs` when that file exists, else to `a.rs`.
//! Re-exports are not followed: naming `crate::server::Body` depends on `server`
//! even when `server` only re-exports it, because moving `Body` breaks that line.
//! A parent declaring `mod child;` is not by itself an edge (the parent owns the
//! child; only code that names the child's items depends on it).
//!
//! A cycle fails the test, naming each module on it and the line that makes each
//! edge. There is no allow-list: a cycle is fixed by moving the item that closes it
//! to where both sides can depend on it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

#[test]
fn every_workspace_crate_has_an_acyclic_module_graph() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives inside the workspace");
    let members = workspace_members(root);
    assert!(
        members.iter().any(|m| m.ends_with("gateway")),
        "workspace members not found in {}: {members:?}",
        root.display()
    );
    let mut report = Vec::new();
    let mut roots_seen = 0;
    for member in &members {
        let dir = root.join(member);
        for crate_root in crate_roots(&dir.join("src")) {
            roots_seen += 1;
            let graph = Graph::load(&crate_root, &|p| std::fs::read_to_string(p).ok())
                .unwrap_or_else(|e| panic!("{e}"));
            for cycle in graph.cycles() {
                report.push(format!("{member}: {cycle}"));
            }
        }
    }
    assert!(roots_seen >= members.len(), "a member without crate roots");
    assert!(
        report.is_empty(),
        "module cycles (see the //! header of testkit/tests/module_graph.rs for the rule):\n\n{}",
        report.join("\n\n")
    );
}

/// The member directories of the workspace, relative to its root. A trailing `/*`
/// is expanded to the subdirectories holding a `Cargo.toml`.
fn workspace_members(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).expect("workspace Cargo.toml");
    let doc: toml::Table = toml::from_str(&text).expect("workspace Cargo.toml parses");
    let members = doc
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .expect("[workspace] members");
    let mut out = Vec::new();
    for m in members.iter().filter_map(|m| m.as_str()) {
        match m.strip_suffix("/*") {
            Some(parent) => {
                let mut found: Vec<String> = std::fs::read_dir(root.join(parent))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().join("Cargo.toml").is_file())
                    .map(|e| format!("{parent}/{}", e.file_name().to_string_lossy()))
                    .collect();
                found.sort();
                out.extend(found);
            }
            None => out.push(m.to_owned()),
        }
    }
    out
}

/// The crate root files in a `src/` directory, by Cargo's default layout.
fn crate_roots(src: &Path) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.is_file())
        .collect();
    let mut bins: Vec<PathBuf> = std::fs::read_dir(src.join("bin"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            if p.extension().is_some_and(|e| e == "rs") {
                Some(p)
            } else {
                Some(p.join("main.rs")).filter(|m| m.is_file())
            }
        })
        .collect();
    bins.sort();
    roots.extend(bins);
    roots
}

/// A module path from the crate root: `[]` is the root, `["a", "b"]` is `crate::a::b`.
type ModPath = Vec<String>;

/// Where an edge comes from: the first reference found.
#[derive(Debug, Clone)]
struct Site {
    file: PathBuf,
    line: usize,
    path: String,
}

/// One crate's module files and the references between them.
struct Graph {
    root_file: PathBuf,
    /// Every module, inline ones included, to the module path of its file.
    modules: HashMap<ModPath, ModPath>,
    /// File modules to their file.
    files: BTreeMap<ModPath, PathBuf>,
    /// `from -> to -> first site`, between file modules, without self edges.
    edges: BTreeMap<ModPath, BTreeMap<ModPath, Site>>,
}

/// A module file that cannot be found or parsed.
#[derive(Debug)]
struct LoadError(String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One parsed module file, waiting for its references to be resolved.
struct Parsed {
    module: ModPath,
    file: PathBuf,
    ast: syn::File,
}

impl Graph {
    /// Follows `mod x;` from `root` and resolves every reference; `read` gives a
    /// file's text (the disk, or a map in the checker's own tests).
    fn load(root: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Result<Graph, LoadError> {
        let mut graph = Graph {
            root_file: root.to_owned(),
            modules: HashMap::new(),
            files: BTreeMap::new(),
            edges: BTreeMap::new(),
        };
        let root_dir = root.parent().unwrap_or(Path::new("")).to_owned();
        let mut parsed = Vec::new();
        // (module path, file, directory of its `mod x;` children)
        let mut queue = VecDeque::from([(ModPath::new(), root.to_owned(), root_dir)]);
        while let Some((module, file, child_dir)) = queue.pop_front() {
            let text =
                read(&file).ok_or_else(|| LoadError(format!("cannot read {}", file.display())))?;
            let ast = syn::parse_file(&text)
                .map_err(|e| LoadError(format!("{}: {e}", file.display())))?;
            graph.files.insert(module.clone(), file.clone());
            let mut decls = Vec::new();
            collect_mods(
                &ast.items,
                &module,
                &child_dir,
                &mut decls,
                &mut graph.modules,
                &module,
            );
            for (child, dir, name) in decls {
                let candidates = [
                    dir.join(format!("{name}.rs")),
                    dir.join(&name).join("mod.rs"),
                ];
                let found = candidates
                    .iter()
                    .find(|p| read(p).is_some())
                    .ok_or_else(|| {
                        LoadError(format!(
                            "{}: module `{name}` not found at {} or {}",
                            file.display(),
                            candidates[0].display(),
                            candidates[1].display()
                        ))
                    })?;
                graph.modules.insert(child.clone(), child.clone());
                queue.push_back((child, found.clone(), dir.join(&name)));
            }
            graph.modules.insert(module.clone(), module.clone());
            parsed.push(Parsed { module, file, ast });
        }
        for p in &parsed {
            let mut refs = Refs {
                graph: &graph,
                scope: p.module.clone(),
                found: Vec::new(),
            };
            refs.visit_file(&p.ast);
            let found = refs.found;
            for (target, site_path, line) in found {
                let to = graph.modules[&target].clone();
                if to != p.module {
                    graph
                        .edges
                        .entry(p.module.clone())
                        .or_default()
                        .entry(to)
                        .or_insert(Site {
                            file: p.file.clone(),
                            line,
                            path: site_path,
                        });
                }
            }
        }
        Ok(graph)
    }

    /// One cycle per strongly connected component of more than one module.
    fn cycles(&self) -> Vec<Cycle> {
        let mut out = Vec::new();
        for scc in self.components() {
            if scc.len() < 2 {
                continue;
            }
            out.push(Cycle {
                root: self.root_file.clone(),
                path: self.shortest_cycle(&scc),
                members: scc,
                edges: self.edges.clone(),
            });
        }
        out
    }

    /// Tarjan's strongly connected components, iteratively (no recursion limit).
    fn components(&self) -> Vec<BTreeSet<ModPath>> {
        let nodes: Vec<&ModPath> = self.files.keys().collect();
        let index_of: HashMap<&ModPath, usize> =
            nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let succ: Vec<Vec<usize>> = nodes
            .iter()
            .map(|n| {
                self.edges
                    .get(*n)
                    .map(|m| m.keys().filter_map(|t| index_of.get(t).copied()).collect())
                    .unwrap_or_default()
            })
            .collect();
        let n = nodes.len();
        let (mut index, mut low, mut on_stack) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
        let (mut stack, mut next, mut out) = (Vec::new(), 0, Vec::new());
        for start in 0..n {
            if index[start] != usize::MAX {
                continue;
            }
            let mut work = vec![(start, 0usize)];
            while let Some(&mut (v, ref mut i)) = work.last_mut() {
                if *i == 0 {
                    index[v] = next;
                    low[v] = next;
                    next += 1;
                    stack.push(v);
                    on_stack[v] = true;
                }
                if let Some(&w) = succ[v].get(*i) {
                    *i += 1;
                    if index[w] == usize::MAX {
                        work.push((w, 0));
                    } else if on_stack[w] {
                        low[v] = low[v].min(index[w]);
                    }
                    continue;
                }
                work.pop();
                if let Some(&(parent, _)) = work.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut scc = BTreeSet::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        scc.insert(nodes[w].clone());
                        if w == v {
                            break;
                        }
                    }
                    out.push(scc);
                }
            }
        }
        out
    }

    /// The shortest cycle through the component's first module (breadth first).
    fn shortest_cycle(&self, scc: &BTreeSet<ModPath>) -> Vec<ModPath> {
        let start = scc.iter().next().cloned().unwrap_or_default();
        let mut prev: HashMap<ModPath, ModPath> = HashMap::new();
        let mut queue = VecDeque::from([start.clone()]);
        while let Some(v) = queue.pop_front() {
            for w in self.edges.get(&v).into_iter().flat_map(|m| m.keys()) {
                if !scc.contains(w) {
                    continue;
                }
                if *w == start {
                    let mut path = vec![v.clone()];
                    while let Some(p) = prev.get(path.last().unwrap_or(&start)) {
                        path.push(p.clone());
                    }
                    path.reverse();
                    return path;
                }
                if !prev.contains_key(w) && *w != start {
                    prev.insert(w.clone(), v.clone());
                    queue.push_back(w.clone());
                }
            }
        }
        vec![start]
    }
}

/// Records the `mod` items of a file: file modules to load (`decls`) and inline
/// modules, which map to the file they are written in.
fn collect_mods(
    items: &[syn::Item],
    scope: &ModPath,
    child_dir: &Path,
    decls: &mut Vec<(ModPath, PathBuf, String)>,
    modules: &mut HashMap<ModPath, ModPath>,
    file_module: &ModPath,
) {
    for item in items {
        let syn::Item::Mod(m) = item else { continue };
        let name = m.ident.to_string();
        let mut path = scope.clone();
        path.push(name.clone());
        match &m.content {
            None => decls.push((path, child_dir.to_owned(), name)),
            Some((_, inner)) => {
                modules.insert(path.clone(), file_module.clone());
                collect_mods(
                    inner,
                    &path,
                    &child_dir.join(&name),
                    decls,
                    modules,
                    file_module,
                );
            }
        }
    }
}

/// Collects the modules a file's code names: (module, path as written, line).
struct Refs<'g> {
    graph: &'g Graph,
    /// The (possibly inline) module the visitor is in.
    scope: ModPath,
    found: Vec<(ModPath, String, usize)>,
}

impl Refs<'_> {
    /// Resolves a path's leading segments to the deepest existing module. `min_len`
    /// keeps a lone `x` in an expression (a variable that shares a module's name) out.
    fn resolve(&mut self, segments: &[String], line: usize, min_len: usize) {
        let Some(first) = segments.first() else {
            return;
        };
        let (mut at, rest) = match first.as_str() {
            "crate" => (ModPath::new(), &segments[1..]),
            "self" => (self.scope.clone(), &segments[1..]),
            "super" => {
                let mut at = self.scope.clone();
                let mut i = 0;
                while segments.get(i).is_some_and(|s| s == "super") {
                    at.pop();
                    i += 1;
                }
                (at, &segments[i..])
            }
            name => {
                let mut child = self.scope.clone();
                child.push(name.to_owned());
                if segments.len() < min_len || !self.graph.modules.contains_key(&child) {
                    return;
                }
                (self.scope.clone(), segments)
            }
        };
        for seg in rest {
            let mut deeper = at.clone();
            deeper.push(seg.clone());
            if !self.graph.modules.contains_key(&deeper) {
                break;
            }
            at = deeper;
        }
        if self.graph.modules.contains_key(&at) {
            self.found.push((at, segments.join("::"), line));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let line = n.ident.span().start().line;
                if n.ident == "self" {
                    self.resolve(&prefix.clone(), line, 1);
                } else {
                    prefix.push(n.ident.to_string());
                    self.resolve(&prefix.clone(), line, 1);
                    prefix.pop();
                }
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.resolve(&prefix.clone(), r.ident.span().start().line, 1);
                prefix.pop();
            }
            syn::UseTree::Glob(g) => {
                self.resolve(&prefix.clone(), g.star_token.span.start().line, 1);
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// Paths inside macro arguments, which syn leaves as tokens: every run of
    /// `ident :: ident …` (also `$crate::…` in `macro_rules!`).
    fn tokens(&mut self, tokens: TokenStream) {
        let flat = flatten(tokens);
        let mut i = 0;
        while i < flat.len() {
            let TokenTree::Ident(first) = &flat[i] else {
                i += 1;
                continue;
            };
            let mut segments = vec![first.to_string()];
            let line = first.span().start().line;
            let mut j = i + 1;
            while let (
                Some(TokenTree::Punct(a)),
                Some(TokenTree::Punct(b)),
                Some(TokenTree::Ident(id)),
            ) = (flat.get(j), flat.get(j + 1), flat.get(j + 2))
            {
                if a.as_char() != ':' || b.as_char() != ':' {
                    break;
                }
                segments.push(id.to_string());
                j += 3;
            }
            let after_colons = i >= 2
                && matches!((&flat[i - 2], &flat[i - 1]), (TokenTree::Punct(a), TokenTree::Punct(b)) if a.as_char() == ':' && b.as_char() == ':');
            if segments.len() > 1 && !after_colons {
                self.resolve(&segments, line, 2);
            }
            i = j.max(i + 1);
        }
    }
}

fn flatten(tokens: TokenStream) -> Vec<TokenTree> {
    let mut out = Vec::new();
    for t in tokens {
        match t {
            TokenTree::Group(g) => out.extend(flatten(g.stream())),
            t => out.push(t),
        }
    }
    out
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // A file module is its own node, visited from its own file.
        let Some((_, items)) = &m.content else { return };
        self.scope.push(m.ident.to_string());
        for attr in &m.attrs {
            self.visit_attribute(attr);
        }
        for item in items {
            self.visit_item(item);
        }
        self.scope.pop();
    }

    fn visit_vis_restricted(&mut self, _: &'ast syn::VisRestricted) {
        // `pub(crate)`, `pub(super)`: who may see an item, not a use of another module.
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if u.leading_colon.is_none() {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() {
            let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            let line = p
                .segments
                .first()
                .map_or(0, |s| s.ident.span().start().line);
            self.resolve(&segments, line, 2);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.tokens(m.tokens.clone());
    }
}

/// A cycle found in a crate: the modules on it in order, and its whole component.
struct Cycle {
    root: PathBuf,
    path: Vec<ModPath>,
    members: BTreeSet<ModPath>,
    edges: BTreeMap<ModPath, BTreeMap<ModPath, Site>>,
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.join("::")
    }
}

impl Cycle {
    fn sorted_members(&self) -> Vec<String> {
        self.members.iter().map(name).collect()
    }
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.path.iter().map(name).collect();
        write!(
            f,
            "cycle in the crate rooted at {}: {} -> {}",
            self.root.display(),
            names.join(" -> "),
            names.first().map_or("", |s| s)
        )?;
        for (i, from) in self.path.iter().enumerate() {
            let to = &self.path[(i + 1) % self.path.len()];
            if let Some(site) = self.edges.get(from).and_then(|m| m.get(to)) {
                write!(
                    f,
                    "\n    {} -> {}: {}:{} names `{}`",
                    name(from),
                    name(to),
                    site.file.display(),
                    site.line,
                    site.path
                )?;
            }
        }
        if self.members.len() > self.path.len() {
            write!(
                f,
                "\n    the strongly connected component also holds: {}",
                self.sorted_members().join(", ")
            )?;
        }
        Ok(())
    }
}

/// The checker's own tests, on crates written in memory.
mod checker {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> Graph {
        let files: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, s)| (Path::new("src").join(p), (*s).to_owned()))
            .collect();
        Graph::load(Path::new("src/lib.rs"), &|p| files.get(p).cloned()).expect("loads")
    }

    fn cycles(files: &[(&str, &str)]) -> Vec<Vec<String>> {
        graph(files)
            .cycles()
            .iter()
            .map(Cycle::sorted_members)
            .collect()
    }

    #[test]
    fn finds_a_cycle_and_names_its_edges() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b; mod c;"),
            ("a.rs", "use crate::b::B; pub struct A;"),
            ("b.rs", "pub struct B; fn f() { super::c::g(); }"),
            ("c.rs", "pub fn g() { let _ = crate::a::A; }"),
        ]);
        let found = g.cycles();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].sorted_members(), ["a", "b", "c"]);
        let text = found[0].to_string();
        assert!(
            text.contains("a -> b: src/a.rs:1 names `crate::b::B`"),
            "{text}"
        );
        assert!(
            text.contains("c -> a: src/c.rs:1 names `crate::a::A`"),
            "{text}"
        );
    }

    #[test]
    fn a_dag_passes() {
        assert!(
            cycles(&[
                ("lib.rs", "mod a; mod b; pub use a::A; fn f() { b::g(); }"),
                ("a.rs", "pub struct A;"),
                ("b.rs", "use crate::a::A; pub fn g() -> A { A }"),
            ])
            .is_empty()
        );
    }

    #[test]
    fn inline_tests_with_super_glob_belong_to_their_file() {
        // `mod x;` from the parent is no edge; `super::*` in an inline module is the
        // file itself; a file child using its parent is one edge, not a cycle.
        assert!(
            cycles(&[
                ("lib.rs", "mod a;"),
                (
                    "a.rs",
                    "mod b; pub struct A; #[cfg(test)] mod tests { use super::*; }"
                ),
                (
                    "a/b.rs",
                    "use super::A; #[cfg(test)] mod tests { use super::*; }"
                ),
            ])
            .is_empty()
        );
    }

    #[test]
    fn the_deepest_existing_module_is_the_target() {
        // `crate::a::b::f` is an edge to a/b.rs, not to a.rs, so no cycle with a.rs.
        let files = [
            ("lib.rs", "mod a; mod c;"),
            ("a.rs", "pub mod b; use crate::c::C;"),
            ("a/b.rs", "pub fn f() {}"),
            ("c.rs", "pub struct C; fn g() { crate::a::b::f(); }"),
        ];
        assert!(cycles(&files).is_empty());
        let g = graph(&files);
        let to: Vec<String> = g.edges[&vec!["c".to_owned()]].keys().map(name).collect();
        assert_eq!(to, ["a::b"]);
    }

    #[test]
    fn paths_in_macros_and_relative_child_paths_count() {
        assert_eq!(
            cycles(&[
                ("lib.rs", "mod a; mod b;"),
                (
                    "a.rs",
                    "mod inner { fn f() { println!(\"{}\", crate::b::X); } }"
                ),
                (
                    "b.rs",
                    "pub const X: u8 = 1; fn g() { let _ = super::a::Y; }"
                ),
            ]),
            [["a", "b"]]
        );
        // The crate root naming a child by its bare name, and the child naming the root.
        assert_eq!(
            cycles(&[
                ("lib.rs", "mod a; pub struct R; fn f() { a::g(); }"),
                ("a.rs", "use crate::R; pub(crate) fn g() {}")
            ]),
            [["crate", "a"]]
        );
    }

    #[test]
    fn a_variable_named_like_a_module_is_not_a_reference() {
        assert!(
            cycles(&[
                (
                    "lib.rs",
                    "mod node; pub struct R; fn f(node: u8) -> u8 { node }"
                ),
                (
                    "node.rs",
                    "use crate::R; pub(crate) struct N; pub(in crate::node) fn g() {}"
                ),
            ])
            .is_empty()
        );
    }
}
