//! `vpstag man`: the manual pages, from the clap definitions (name, synopsis, description,
//! options) plus the sections clap knows nothing of: EXIT STATUS, ENVIRONMENT, FILES and
//! EXAMPLES, written here for the whole program (`vpstag.1`) and for each command
//! (`vpstag-COMMAND.1`).

use std::io;

use roff::{bold, roman, Roff};

/// One entry of a section: a tag (an exit status, a variable, a path, a command line) and what
/// it means.
type Item = (&'static str, &'static str);

/// The exit statuses of `cmd` (`None`: the whole program).
fn exit_status(cmd: Option<&str>) -> Vec<Item> {
    const ERROR: Item = ("2", "An error; the message on standard error says what (a usage error included).");
    match cmd {
        None => vec![
            ("0", "Success."),
            ("1", "which: the process has no tag. check: the daemon's table and the system diverge."),
            ("2", "An error, a usage error included (every command but run and exec)."),
            (
                "run, exec",
                "The status of CMD (128 + N when signal N ended it). When vpstag itself fails it exits 125 \
                 (a usage error included), 126 when CMD was found but cannot be executed, 127 when CMD is \
                 not found, as env(1), timeout(1) and docker run do, so that it is never taken for CMD's own \
                 status.",
            ),
        ],
        Some("run" | "exec") => vec![
            ("CMD's status", "When CMD exits: its exit code, or 128 + N when signal N ended it."),
            (
                "125",
                "vpstag itself failed (a bad or missing argument, no daemon, an unknown VPS...; 1-124 belong \
                 to CMD).",
            ),
            ("126", "CMD was found but cannot be executed (permission denied, not an executable...)."),
            ("127", "CMD was not found."),
        ],
        Some("which") => vec![("0", "PID has a tag: its VPS is printed."), ("1", "PID has no tag."), ERROR],
        Some("check") => vec![
            ("0", "The table and a fresh scan of the system agree."),
            ("1", "They diverge: every divergence is printed."),
            ERROR,
        ],
        Some("daemon") => vec![("0", "Stopped by SIGTERM or SIGINT (the VPSes keep running)."), ERROR],
        Some(_) => vec![("0", "Success."), ERROR],
    }
}

const SOCKET_VAR: Item = (
    "VPSTAG_SOCKET",
    "The daemon's socket when --socket is not given (otherwise /run/vpstag/vpstag.sock): where the daemon \
     listens and where the other commands connect.",
);
const PATH_VAR: Item = (
    "PATH",
    "Where CMD is looked for when it has no slash (/usr/local/bin:/usr/bin:/bin when unset). CMD gets the \
     whole environment of the command that starts it, unchanged.",
);

/// The environment variables `cmd` reads.
fn environment(cmd: Option<&str>) -> Vec<Item> {
    match cmd {
        None | Some("start" | "exec") => vec![SOCKET_VAR, PATH_VAR],
        Some("run") => vec![PATH_VAR],
        Some("daemon" | "ps" | "which" | "list" | "kill" | "stop" | "events" | "check") => vec![SOCKET_VAR],
        Some(_) => vec![],
    }
}

const SOCKET_FILE: Item = (
    "/run/vpstag/vpstag.sock",
    "The daemon's socket unless --socket or VPSTAG_SOCKET say otherwise. The daemon gives it mode 0666 (every \
     request is authorised by the caller's credentials) and creates its directory with mode 0755 when missing.",
);
const STATE_DIR: Item = (
    "/var/lib/vpstag/",
    "The daemon's state directory unless --state-dir says otherwise; created with mode 0700, it must be owned \
     by root (or the daemon's user) and not writable by others. It holds snapshot.json and journal.jsonl (the \
     VPSes and their roots), journal.prev.jsonl (a journal being folded into a new snapshot), lock (held by \
     the running daemon), and the copies of unreadable files set aside by --discard-bad-journal \
     (journal.bad-TIME.jsonl, snapshot.bad-TIME.json).",
);
const PROC: Item = (
    "/proc",
    "Where processes are read on Linux: parents and start times (after lost events and at start-up), \
     command lines, CPU time and memory.",
);
const DEV_NULL: Item = ("/dev/null", "The standard input of a started VPS, and its output unless --output FILE.");

/// The files `cmd` uses.
fn files(cmd: Option<&str>) -> Vec<Item> {
    match cmd {
        None => vec![SOCKET_FILE, STATE_DIR, PROC, DEV_NULL],
        Some("daemon") => vec![SOCKET_FILE, STATE_DIR, PROC],
        Some("run") => vec![PROC],
        Some("start") => vec![SOCKET_FILE, DEV_NULL],
        Some("exec" | "ps" | "which" | "list" | "kill" | "stop" | "events" | "check") => vec![SOCKET_FILE],
        Some(_) => vec![],
    }
}

/// Command lines that show `cmd` at work, each with what it does.
fn examples(cmd: Option<&str>) -> Vec<Item> {
    let run = [
        (
            "vpstag run demo -- sh -c 'sleep 1 & setsid sh -c \"sleep 30 &\"; sleep 1'",
            "Prints every fork, exec and exit of the tree; when sh exits, ends the daemon that escaped with \
             setsid (SIGTERM, SIGKILL 5 s later).",
        ),
        (
            "vpstag run --json-events - --wait-all build -- make -j4 | jq -c 'select(.event == \"exec\")'",
            "The events as JSON lines on standard output, until every process of the build has exited.",
        ),
    ];
    let daemon = [(
        "vpstag daemon --state-dir /var/lib/vpstag",
        "Serves the other commands on /run/vpstag/vpstag.sock (contrib/systemd/ has a unit).",
    )];
    let start = [(
        "vpstag start web --output /var/log/web.log -- python3 -m http.server 8080",
        "Starts VPS web in the background with the caller's credentials and prints its first process's pid.",
    )];
    let exec = [(
        "vpstag exec web -- sh -c 'cd /srv && ./migrate'",
        "Runs a command inside the running VPS web: it and all it starts are members.",
    )];
    let ps = [("vpstag ps web --tree", "The live processes of VPS web as a tree.")];
    let which = [
        ("vpstag which $$", "The VPS of the shell (a member may always ask about itself)."),
        ("vpstag which --json 1234", "{\"pid\": 1234, \"vps\": \"web\"}, or \"vps\": null and status 1 when untagged."),
    ];
    let list = [("vpstag list --json | jq '.[] | {name, members, rss_bytes}'", "Members and memory per VPS.")];
    let kill = [
        ("vpstag kill web --signal HUP", "Sends SIGHUP to every member of web, escaped daemons too."),
        ("vpstag kill web -s 9", "SIGKILL, again and again until no member is left."),
    ];
    let stop = [(
        "vpstag stop web --grace 10",
        "SIGTERM, SIGKILL after 10 s to what is left (saying every second what it waits for), and forgets web.",
    )];
    let events = [
        ("vpstag events web --follow --json", "The recent events of web, then every new one, as JSON lines."),
        (
            "vpstag events web --json --after 4711",
            "Resumes a follow that ended: every event of web after the one whose seq was 4711, then new ones.",
        ),
    ];
    let check = [("vpstag check || vpstag check --json", "Whether the table matches a fresh scan of the system.")];
    let completions = [(
        "vpstag completions bash > /etc/bash_completion.d/vpstag",
        "Installs the bash completions (zsh and fish too).",
    )];
    let man = [("vpstag man --dir /usr/local/share/man/man1", "Writes vpstag.1 and one page per command.")];
    match cmd {
        None => [&run[..], &daemon, &start, &exec, &ps, &which, &kill, &stop, &events, &completions, &man].concat(),
        Some("run") => run.to_vec(),
        Some("daemon") => daemon.to_vec(),
        Some("start") => start.to_vec(),
        Some("exec") => exec.to_vec(),
        Some("ps") => ps.to_vec(),
        Some("which") => which.to_vec(),
        Some("list") => list.to_vec(),
        Some("kill") => kill.to_vec(),
        Some("stop") => stop.to_vec(),
        Some("events") => events.to_vec(),
        Some("check") => check.to_vec(),
        Some("completions") => completions.to_vec(),
        Some("man") => man.to_vec(),
        Some(_) => vec![],
    }
}

/// The four sections for `cmd` (`None`: the whole program), in roff, after the two-line preamble
/// that defines how an apostrophe is typeset (clap_mangen's page starts with the same one).
fn sections(cmd: Option<&str>) -> String {
    let mut r = Roff::new();
    let mut section = |title: &str, items: Vec<Item>, none: &str| {
        r.control("SH", [title]);
        if items.is_empty() {
            r.text([roman(none)]);
        }
        for (tag, text) in items {
            r.control("TP", []);
            r.text([bold(tag)]);
            r.text([roman(text)]);
        }
    };
    section("EXIT STATUS", exit_status(cmd), "");
    section("ENVIRONMENT", environment(cmd), "No environment variable changes what this command does.");
    section("FILES", files(cmd), "This command uses no file of its own.");
    section("EXAMPLES", examples(cmd), "");
    r.render()
}

/// The page of `cmd` (`sub`: the command's name, `None` for `vpstag` itself): what clap_mangen
/// renders, with [`sections`] before VERSION (or at the end).
pub(super) fn page(cmd: clap::Command, sub: Option<&str>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    let page = String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let extra = sections(sub);
    // The preamble is needed once: drop ours when the page has the same.
    let preamble = extra.match_indices('\n').nth(1).map_or(0, |(i, _)| i + 1);
    let extra = if page.starts_with(&extra[..preamble]) { &extra[preamble..] } else { &extra[..] };
    let page = match page.find("\n.SH VERSION") {
        Some(at) => format!("{}\n{}{}", &page[..at], extra, &page[at + 1..]),
        None => format!("{page}{extra}"),
    };
    Ok(page.into_bytes())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command has its exit statuses and examples; the lists name only real commands.
    #[test]
    fn every_command_has_exit_statuses_and_examples() {
        for sub in super::super::Cli::command().get_subcommands() {
            let name = sub.get_name();
            assert!(!exit_status(Some(name)).is_empty(), "{name}");
            assert!(!examples(Some(name)).is_empty(), "{name}");
            for (line, _) in examples(Some(name)) {
                assert!(line.starts_with(&format!("vpstag {name}")), "{name}: {line}");
            }
        }
    }

    #[test]
    fn the_sections_come_before_version_and_escape_what_roff_would_read() {
        let page = String::from_utf8(page(super::super::Cli::command(), None).unwrap()).unwrap();
        let at = |s: &str| page.find(s).unwrap_or_else(|| panic!("no {s:?} in\n{page}"));
        assert!(at(".SH OPTIONS") < at(".SH \"EXIT STATUS\"") && at(".SH EXAMPLES") < at(".SH VERSION"));
        // A text line starting with a dot or quote would be a request.
        assert!(!page.lines().any(|l| l.starts_with("'") || l.starts_with(".TP ")), "{page}");
        assert!(page.contains("\\-\\-json\\-events"), "dashes are escaped");
    }
}
