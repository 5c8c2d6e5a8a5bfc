//! Every command the READMEs show is covered by a check, so the READMEs cannot rot: the tour's
//! commands run against the demo (`tour.rs`); `cargo xtask …` lines go through xtask's own
//! parser; the cargo and rustup lines must be the ones xtask runs; `host-shim …` lines are
//! parsed by host-shim's own argument parser (its `readme_usage` test); the Docker and
//! Kubernetes lines, which cannot run here (no Docker engine, no cluster), must name files that
//! exist (the deploy checks validate those files), and the kubectl and istioctl lines that
//! inspect a cluster must name objects those files define. A command no rule covers fails the
//! test.

use crate::cli;
use crate::markdown;
use crate::test_suite::CHECKS;
use crate::tour;
use crate::workspace::{BINARIES_ARGS, STOCK_PLUGIN_ARGS, TEST_BUILD_ARGS, WASM_TARGET};
use std::path::{Path, PathBuf};

const DOCS: [&str; 2] = ["README.md", "envoy/README.md"];

/// Programs whose lines count as commands, in code blocks or inline code.
const PROGRAMS: [&str; 7] = [
    "cargo ",
    "curl ",
    "docker ",
    "kubectl ",
    "istioctl ",
    "rustup ",
    "host-shim ",
];

/// Where the Kubernetes manifests live.
const MANIFESTS: &str = "envoy";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The commands of a markdown text: lines of `sh` blocks (comments dropped) and inline code
/// spans that start with one of `PROGRAMS`.
fn commands(markdown: &str) -> Vec<String> {
    let lines = markdown::lines(markdown)
        .unwrap_or_else(|start| panic!("line {start}: a code block is not closed"));
    let mut out = Vec::new();
    let mut prose = String::new();
    for line in &lines {
        match line.fence {
            Some("sh") => {
                let trimmed = line.text.trim();
                let command = match trimmed.find(" #") {
                    Some(i) => trimmed[..i].trim_end(),
                    None => trimmed,
                };
                if !command.is_empty() && !command.starts_with('#') {
                    out.push(command.to_string());
                }
            }
            Some(_) => {}
            None => {
                prose.push_str(line.text);
                prose.push('\n');
            }
        }
    }
    // Odd pieces between backticks are code spans (they may wrap over lines).
    for span in prose.split('`').skip(1).step_by(2) {
        let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
        if PROGRAMS.iter().any(|p| span.starts_with(p)) {
            out.push(span);
        }
    }
    out
}

fn same_args(shown: &[&str], run: &[&str]) -> bool {
    let (mut a, mut b) = (shown.to_vec(), run.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// The file after `-f` in a command, relative to the repository root.
fn file_flag<'a>(words: &[&'a str]) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == "-f")
        .and_then(|i| words.get(i + 1).copied())
}

fn must_exist(path: &str) -> Result<String, String> {
    if root().join(path).is_file() {
        Ok(format!("{path} exists (validated by the deploy checks)"))
    } else {
        Err(format!("names {path}, which does not exist"))
    }
}

/// (kind, namespace, name) of every Kubernetes object in the manifests under `MANIFESTS`
/// (multi-document YAML files; documents without `kind` and `metadata.name`, such as
/// envoy.yaml, are not objects).
fn manifest_objects() -> Vec<(String, String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join(MANIFESTS), &mut files);
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let docs = text.split("\n---\n");
        for value in docs.filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok()) {
            let field = |path: &[&str]| {
                path.iter()
                    .try_fold(&value, |v, k| v.get(*k))
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            if let (Some(kind), Some(name)) = (field(&["kind"]), field(&["metadata", "name"])) {
                let namespace = field(&["metadata", "namespace"]).unwrap_or_default();
                objects.push((kind, namespace, name));
            }
        }
    }
    objects
}

/// `KIND/NAME` in `namespace` is an object of the manifests (the kind case-insensitive, as
/// kubectl takes it).
fn object_defined(namespace: &str, reference: &str) -> Result<String, String> {
    let (kind, name) = reference
        .split_once('/')
        .ok_or(format!("{reference:?}: name the object as KIND/NAME"))?;
    let found = manifest_objects()
        .iter()
        .any(|(k, ns, n)| k.eq_ignore_ascii_case(kind) && ns == namespace && n == name);
    match found {
        true => Ok(format!("{reference} in {namespace} is in the manifests")),
        false => Err(format!(
            "no manifest under {MANIFESTS}/ defines {reference} in namespace {namespace}"
        )),
    }
}

/// `NAME.NAMESPACE.svc.cluster.local` is a Service of the manifests.
fn service_fqdn_defined(fqdn: &str) -> Result<String, String> {
    let (name, namespace) = fqdn
        .strip_suffix(".svc.cluster.local")
        .and_then(|rest| rest.split_once('.'))
        .ok_or(format!("{fqdn:?} is not NAME.NAMESPACE.svc.cluster.local"))?;
    object_defined(namespace, &format!("Service/{name}"))
}

/// The package directory of a workspace member named `name`.
fn member_dir(name: &str) -> Option<PathBuf> {
    let root = root();
    std::fs::read_dir(&root).ok()?.flatten().find_map(|e| {
        let manifest = std::fs::read_to_string(e.path().join("Cargo.toml")).ok()?;
        manifest
            .lines()
            .any(|l| l.replace(' ', "") == format!("name=\"{name}\""))
            .then(|| e.path())
    })
}

/// How a command is covered, or why it is not.
fn check(command: &str, tour_commands: &[String], doc: &str) -> Result<String, String> {
    let owned = shell_words(command);
    let words: Vec<&str> = owned.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["cargo", "xtask", args @ ..] => {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            cli::parse_with_env(&args, None)
                .map(|_| "xtask's parser takes it".to_string())
                .map_err(|e| format!("xtask refuses it: {e:#}"))
        }
        ["cargo", "build", args @ ..] => {
            if same_args(&words[1..], &STOCK_PLUGIN_ARGS) || same_args(&words[1..], &BINARIES_ARGS)
            {
                Ok("the build xtask runs".into())
            } else {
                Err(format!(
                    "not a build xtask runs ({STOCK_PLUGIN_ARGS:?} or {BINARIES_ARGS:?}): {args:?}"
                ))
            }
        }
        ["cargo", "test", "-p", package, "--test", name] => {
            let dir = member_dir(package).ok_or(format!("no workspace member {package}"))?;
            let file = dir.join("tests").join(format!("{name}.rs"));
            if file.is_file() {
                Ok(format!("{} exists", file.display()))
            } else {
                Err(format!("{} does not exist", file.display()))
            }
        }
        ["cargo", args @ ..] if *args == TEST_BUILD_ARGS => Ok("the build xtask test runs".into()),
        ["cargo", args @ ..] => {
            if CHECKS.iter().any(|(_, run)| *run == args) {
                Ok("a step xtask test runs".into())
            } else {
                Err("not a cargo command xtask runs".into())
            }
        }
        ["curl", ..] => {
            if tour_commands.iter().any(|c| c == command) {
                Ok("run by the tour".into())
            } else {
                Err(
                    "a curl line the tour does not run (put it in a console block of README.md \
                     or an sh block of envoy/README.md)"
                        .into(),
                )
            }
        }
        ["rustup", "target", "add", target] => {
            if *target == WASM_TARGET {
                Ok("what xtask's setup runs".into())
            } else {
                Err(format!("xtask's setup adds {WASM_TARGET}, not {target}"))
            }
        }
        ["docker", "compose", "-f", file, "up", "--build"]
        | ["docker", "compose", "-f", file, "down"] => must_exist(file),
        ["docker", "build", rest @ ..] if rest.last() == Some(&".") => {
            must_exist(file_flag(rest).ok_or("docker build without -f")?)
        }
        ["docker", "push", tag] => {
            let built = commands(doc).iter().any(|c| {
                let w: Vec<&str> = c.split_whitespace().collect();
                w.starts_with(&["docker", "build"]) && w.windows(2).any(|p| p == ["-t", *tag])
            });
            if built {
                Ok("pushes the image built above".into())
            } else {
                Err(format!("pushes {tag}, which no docker build line builds"))
            }
        }
        ["kubectl", "apply", "-f", file] => must_exist(file),
        ["kubectl", "-n", namespace, "rollout", "status", object]
        | ["kubectl", "-n", namespace, "get", object, "-o", "yaml"] => {
            object_defined(namespace, object)
        }
        ["istioctl", "proxy-config", "cluster", _proxy, "-n", _namespace, "--fqdn", fqdn] => {
            service_fqdn_defined(fqdn)
        }
        ["host-shim", "run" | "relay", ..] => Ok("host-shim's readme_usage test parses it".into()),
        ["krowoc-relay", ..] => Ok("krowoc-relay's readme_usage test parses it".into()),
        _ => Err("no check covers this command".into()),
    }
}

/// Splits a command line as a POSIX shell would for plain words and '…' / "…" quoting (no
/// expansions: the READMEs' commands do not need them).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

fn tour_commands(root: &Path) -> Vec<String> {
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let deploy = std::fs::read_to_string(root.join("envoy/README.md")).unwrap();
    let mut all: Vec<String> = tour::console_steps("README.md", &readme)
        .unwrap()
        .into_iter()
        .map(|s| s.command)
        .collect();
    all.extend(tour::sh_lines("envoy/README.md", &deploy, "curl ").unwrap());
    all
}

#[test]
fn every_command_in_the_readmes_is_covered_by_a_check() {
    let root = root();
    let tour = tour_commands(&root);
    let mut problems = Vec::new();
    let mut covered = 0;
    for doc in DOCS {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        let found = commands(&text);
        assert!(!found.is_empty(), "{doc} shows no command?");
        for command in found {
            let command = tour_line(&command, &tour);
            match check(&command, &tour, &text) {
                Ok(_) => covered += 1,
                Err(why) => problems.push(format!("{doc}: `{command}`: {why}")),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "commands the READMEs show that nothing checks:\n{}\n(add a check in \
         xtask/src/doc_commands.rs, or fix the command)",
        problems.join("\n")
    );
    assert!(covered >= 20, "only {covered} commands found");
}

/// A curl line of envoy/README.md is run whole (its comment is shell syntax too).
fn tour_line(command: &str, tour: &[String]) -> String {
    tour.iter()
        .find(|t| t.starts_with(command) && t[command.len()..].trim_start().starts_with('#'))
        .cloned()
        .unwrap_or_else(|| command.to_string())
}

#[test]
fn commands_come_from_sh_blocks_and_inline_code() {
    let md = "Run `cargo xtask\ndemo` or `ls -l`.\n```sh\n# a comment\ncurl -s x   # why\n\n```\n\
              ```console\n$ curl y\n```\n";
    assert_eq!(commands(md), vec!["curl -s x", "cargo xtask demo"]);
}

#[test]
fn words_are_split_as_the_shell_splits_them() {
    assert_eq!(
        shell_words(r#"bench --only "route without" --only 'a b' x"" """#),
        vec!["bench", "--only", "route without", "--only", "a b", "x", ""]
    );
}

#[test]
fn a_broken_reference_fails_its_check() {
    let tour = vec!["curl -s http://127.0.0.1:10000/health".to_string()];
    let ok = |c: &str| check(c, &tour, "```sh\ndocker build -f x -t img:1 .\n```\n");
    assert!(ok("cargo xtask bench --duration 3").is_ok());
    assert!(
        ok("cargo xtask bench --duraton 3").is_err(),
        "a misspelt flag"
    );
    assert!(
        ok("cargo xtask deploy").is_err(),
        "an unknown xtask command"
    );
    assert!(ok("rustup target add wasm32-unknown-unknown").is_err());
    assert!(ok("cargo build -p krowoc-plugin --target wasm32-wasip1 --profile wasm").is_err());
    assert!(ok(
        "cargo build -p krowoc-plugin --target wasm32-wasip1 --profile wasm --no-default-features"
    )
    .is_ok());
    assert!(ok("cargo test -p krowoc-tests --test deploy_checks").is_ok());
    assert!(ok("cargo test -p krowoc-tests --test deploy_chekcs").is_err());
    assert!(ok("docker compose -f envoy/docker-compose.yml up --build").is_ok());
    assert!(ok("docker compose -f envoy/docker-compose.yaml up --build").is_err());
    assert!(ok("kubectl apply -f envoy/higress/wasmplugin.yml").is_err());
    assert!(ok("kubectl -n krowoc-edge rollout status deployment/krowoc-relay").is_ok());
    assert!(
        ok("kubectl -n default rollout status deployment/krowoc-relay").is_err(),
        "another namespace"
    );
    assert!(ok("kubectl -n krowoc-edge get envoypatchpolicy/krowoc-relay-cluster -o yaml").is_ok());
    assert!(ok("kubectl -n krowoc-edge get envoypatchpolicy/relay -o yaml").is_err());
    let istioctl =
        "istioctl proxy-config cluster deploy/istio-ingressgateway -n istio-system --fqdn";
    assert!(ok(&format!(
        "{istioctl} krowoc-relay.krowoc-edge.svc.cluster.local"
    ))
    .is_ok());
    assert!(ok(&format!("{istioctl} relay.krowoc-edge.svc.cluster.local")).is_err());
    assert!(ok("docker push img:1").is_ok());
    assert!(ok("docker push img:2").is_err(), "an image nothing builds");
    assert!(ok("curl -s http://127.0.0.1:10000/health").is_ok());
    assert!(
        ok("curl -s http://127.0.0.1:10000/other").is_err(),
        "not in the tour"
    );
    assert!(ok("make install").is_err(), "no rule at all");
}
