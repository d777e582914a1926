//! The command line itself, through the real binary: exit statuses of usage errors, shell
//! completions that know the values of `--backend` and `--signal`, and the man pages' sections.
//! Needs no daemon and no privilege.

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_vpstag");

fn vpstag(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("running vpstag")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `vpstag run`'s statuses 1-124 belong to CMD: a command line clap refuses exits 125 there,
/// and 2 (clap's usual) for every other command; help and version exit 0.
#[test]
fn usage_errors_exit_125_for_run_and_exec_and_2_elsewhere() {
    for args in [
        &["run"][..],
        &["run", "name"],
        &["run", "--no-such-option", "name", "--", "true"],
        &["run", "--backend", "nope", "name", "--", "true"],
        &["run", "--grace", "inf", "name", "--", "true"],
        &["--socket", "/nonexistent", "run", "name"],
        &["exec"],
        &["exec", "name"],
        &["exec", "--no-such-option", "name", "--", "true"],
    ] {
        let out = vpstag(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains("error:"), "{args:?} says what is wrong: {err}");
    }
    for args in [
        &["kill"][..],
        &["kill", "name", "--signal", "NOPE"],
        &["daemon", "--backend", "nope"],
        &["which"],
        &["--socket", "run", "which"],
        &["no-such-command"],
    ] {
        let out = vpstag(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
    }
    for args in [&["run", "--help"][..], &["--help"], &["--version"], &["help", "run"], &["kill", "-h"]] {
        let out = vpstag(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        assert!(!out.stdout.is_empty(), "{args:?} prints on standard output");
    }
    // A valid `run` line still reaches CMD, whose status is its own.
    let out = vpstag(&["run", "--backend", "ptrace", "-q", "ok", "--", "sh", "-c", "exit 2"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// Bash and zsh completions offer every backend and the usual signal names.
#[test]
fn completions_offer_the_backends_and_the_signal_names() {
    for shell in ["bash", "zsh"] {
        let out = vpstag(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        // Each value appears as a word of the script (bash: compgen -W "...", zsh: (a b c) or a\:help).
        let words: Vec<&str> = script.split(|c: char| !c.is_ascii_alphanumeric()).collect();
        for value in ["auto", "cnproc", "ptrace", "ebpf", "kqueue", "TERM", "KILL", "HUP", "INT", "USR1", "CONT"] {
            assert!(words.contains(&value), "{shell} completions lack {value}");
        }
        if shell == "bash" {
            assert!(
                script.contains("compgen -W \"auto cnproc ptrace ebpf kqueue\""),
                "bash completes --backend from the list"
            );
            let sig = script.lines().find(|l| l.contains("compgen -W \"HUP INT")).unwrap_or_default();
            assert!(sig.contains(" KILL ") && sig.contains(" TERM "), "bash completes --signal: {sig}");
        }
    }
}

/// The page of `vpstag` and of each command carries EXIT STATUS, ENVIRONMENT, FILES and EXAMPLES,
/// with the facts: run's 125/126/127, `$VPSTAG_SOCKET`, the default socket and state directory.
#[test]
fn man_pages_have_exit_status_environment_files_and_examples() {
    let out = vpstag(&["man"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    for section in [".SH \"EXIT STATUS\"", ".SH ENVIRONMENT", ".SH FILES", ".SH EXAMPLES"] {
        assert!(page.contains(section), "vpstag.1 lacks {section}");
    }
    let exit = section(&page, "EXIT STATUS");
    for code in ["125", "126", "127"] {
        assert!(exit.contains(code), "run's {code} in EXIT STATUS:\n{exit}");
    }
    assert!(section(&page, "ENVIRONMENT").contains("VPSTAG_SOCKET"));
    let files = section(&page, "FILES");
    assert!(files.contains("/run/vpstag/vpstag.sock") && files.contains("/var/lib/vpstag"), "{files}");
    assert!(section(&page, "EXAMPLES").contains("vpstag run"));

    let dir = std::env::temp_dir().join(format!("vpstag-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = vpstag(&["man", "--dir", dir.to_str().expect("a UTF-8 path")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let read = |cmd: &str| {
        std::fs::read_to_string(dir.join(format!("vpstag-{cmd}.1"))).unwrap_or_else(|e| panic!("vpstag-{cmd}.1: {e}"))
    };
    let run = read("run");
    let exit = section(&run, "EXIT STATUS");
    assert!(exit.contains("125") && exit.contains("126") && exit.contains("127"), "{exit}");
    assert!(!section(&run, "ENVIRONMENT").contains("VPSTAG_SOCKET"), "run does not talk to the daemon");
    let which = read("which");
    let exit = section(&which, "EXIT STATUS");
    assert!(exit.contains("no tag") && !exit.contains("125"), "{exit}");
    assert!(section(&which, "ENVIRONMENT").contains("VPSTAG_SOCKET"));
    assert!(section(&read("daemon"), "FILES").contains("journal.jsonl"));
    for cmd in ["start", "exec", "ps", "list", "kill", "stop", "events", "check", "completions", "man"] {
        let page = read(cmd);
        for s in ["EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES"] {
            assert!(!section(&page, s).trim().is_empty(), "vpstag-{cmd}.1: empty or missing {s}");
        }
        assert!(section(&page, "EXAMPLES").contains(&format!("vpstag {cmd}")), "vpstag-{cmd}.1");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The text of section `title` of a roff page (up to the next `.SH`); empty when missing.
fn section<'a>(page: &'a str, title: &str) -> &'a str {
    let head = if title.contains(' ') { format!(".SH \"{title}\"\n") } else { format!(".SH {title}\n") };
    let Some(at) = page.find(&head) else { return "" };
    let body = &page[at + head.len()..];
    &body[..body.find("\n.SH ").unwrap_or(body.len())]
}
