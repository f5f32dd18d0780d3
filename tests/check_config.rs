//! `warrenmq check-config FILE`: the checks start-up makes, without starting a
//! broker or touching the data directory; a summary when the file is good,
//! FILE:LINE: reason when it is not.

use std::process::Command;

fn check(name: &str, text: &str) -> (bool, String, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("warrenmq-check-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let file = dir.join(format!("{name}.toml"));
    let text = text.replace("DATA", &data.display().to_string());
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warrenmq"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr, dir)
}

const BASE: &str = "listen = [\"127.0.0.1:5699\"]\ndata_dir = \"DATA\"\n\n[[vhosts]]\nname = \"/\"\n\n[[users]]\nname = \"guest\"\npassword = \"guest\"\n";

#[test]
fn a_good_file_gets_a_summary_and_nothing_is_started_or_written() {
    let topology = "\n[[exchanges]]\nname = \"x\"\ntype = \"topic\"\n\n[[queues]]\nname = \"q\"\n\n[[bindings]]\nsource = \"x\"\ndestination = \"q\"\nrouting_key = \"a.#\"\n";
    let (ok, out, err, dir) = check("good", &format!("{BASE}{topology}"));
    assert!(ok, "{err}");
    assert!(out.contains("good.toml: ok"), "{out}");
    assert!(out.contains("listeners: 127.0.0.1:5699"), "{out}");
    assert!(
        out.contains("exchanges: 1, queues: 1, bindings: 1"),
        "{out}"
    );
    assert!(
        !dir.join("data").exists(),
        "check-config must not create the data directory"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn each_kind_of_error_is_reported_at_its_line() {
    let cases = [
        ("syntax", format!("{BASE}\n[[queues]\nname = \"q\"\n"), "syntax.toml:11:"),
        ("unknown-key", format!("{BASE}colour = \"red\"\n"), "unknown-key.toml:"),
        ("bounds", format!("{BASE}[limits]\nframe_max = 1\n"), "bounds.toml:11:1: limits.frame_max"),
        (
            "exchange-type",
            format!("{BASE}\n[[exchanges]]\nname = \"x\"\ntype = \"nonsense\"\n"),
            "exchange-type.toml:11:1: exchange 'x' in vhost '/': 503 COMMAND_INVALID - unknown exchange type 'nonsense'",
        ),
        (
            "queue-argument",
            format!("{BASE}\n[[queues]]\nname = \"q\"\narguments = {{ \"x-overflow\" = \"sideways\" }}\n"),
            "queue-argument.toml:11:1: queue 'q' in vhost '/': 406 PRECONDITION_FAILED - invalid arg 'x-overflow'",
        ),
        (
            "binding",
            format!("{BASE}\n[[bindings]]\nsource = \"amq.topic\"\ndestination = \"nowhere\"\n"),
            "binding.toml:11:1: binding of queue 'nowhere' to exchange 'amq.topic' in vhost '/': 404 NOT_FOUND - no queue 'nowhere' in vhost '/'",
        ),
        (
            "user",
            BASE.replace("password = \"guest\"", "password_hash = \"AAAA\""),
            "user.toml:9:1: users.guest: password_hash is 3 bytes long",
        ),
    ];
    for (name, text, expected) in cases {
        let (ok, _, err, dir) = check(name, &text);
        assert!(!ok, "{name}: should fail");
        assert!(err.contains(expected), "{name}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
