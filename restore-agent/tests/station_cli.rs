//! The real `restore-agent station` binary with the hidden fake-Mac demo: the dashboard as a
//! person sees it in a terminal (tmux), and the plain line mode a serial console gets.

use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_restore-agent");

#[test]
fn piped_output_is_line_mode_without_escape_codes() {
    let out = Command::new(BIN)
        .args([
            "station",
            "--demo-fake-macs",
            "2",
            "--demo-step-ms",
            "1",
            "--exit-after",
            "2",
        ])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\x1b'), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "station: ready, up to 8 Macs at once; network not configured"
    );
    for p in 1..=2 {
        for want in [
            format!("mac 1-{p}: plugged in (Some(Dfu)), starting"),
            format!("mac 1-{p}: identified MacBook Air (M1, 2020) (MacBookAir10,1, J313AP) ECID 0x0005681C34D3000{p}"),
            format!("mac 1-{p}: build 26.2 (25C56)"),
            format!("mac 1-{p}: stage Stage1"),
            format!("mac 1-{p}: dfu 50% (52428800/104857600 bytes)"),
            format!("mac 1-{p}: done, restored"),
        ] {
            assert!(lines.contains(&want.as_str()), "missing {want:?} in\n{text}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("mac 1-{p}: report {{"))),
            "{text}"
        );
    }
    assert_eq!(
        *lines.last().unwrap(),
        "station stopped: 2 Macs restored, 0 failed"
    );
}

fn tmux(server: &str, args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .arg("-L")
        .arg(server)
        .args(args)
        .output()
        .expect("tmux runs")
}

#[test]
fn terminal_dashboard_in_tmux_shows_one_row_per_mac() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("tmux is not installed: skipping the terminal check (apt-get install tmux)");
        return;
    }
    let server = format!("station-test-{}", std::process::id());
    let cmd = format!("TERM=xterm-256color {BIN} station --demo-fake-macs 3 --demo-step-ms 400");
    let started = tmux(
        &server,
        &["new-session", "-d", "-x", "120", "-y", "30", &cmd],
    );
    assert!(started.status.success(), "{started:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut screen = String::new();
    let mut ok = false;
    while Instant::now() < deadline {
        let cap = tmux(&server, &["capture-pane", "-p", "-t", "0"]);
        screen = String::from_utf8_lossy(&cap.stdout).into_owned();
        let rows: Vec<&str> = screen.lines().collect();
        let has_row = |p: u8| {
            rows.iter().any(|l| {
                l.starts_with(&format!("1-{p} "))
                    && l.contains("MacBookAir10,1")
                    && l.contains(&format!("0x0005681C34D3000{p}"))
                    && l.contains('[')
                    && l.contains("%")
                    && l.contains("MiB/s")
            })
        };
        if rows
            .first()
            .is_some_and(|l| l.starts_with("macrescue station | net: not configured"))
            && rows.iter().any(|l| l.starts_with("PORT     MODEL"))
            && (1..=3).all(has_row)
        {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tmux(&server, &["kill-server"]);
    assert!(
        ok,
        "the dashboard never showed three Mac rows; last screen:\n{screen}"
    );
    // Redrawn in place: the header appears once, not once per redraw.
    assert_eq!(screen.matches("macrescue station |").count(), 1, "{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 120));
}

/// Started by the init before the data partition is mounted (`MACRESCUE_DATA_PENDING`), the
/// station reads its config file only once the init removed the pending file: a config that
/// appears meanwhile is the one it uses.
#[test]
fn an_early_station_reads_its_config_only_once_the_data_partition_is_handled() {
    let dir = std::env::temp_dir().join(format!("macrescue-early-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pending = dir.join("data-pending");
    let config = dir.join("config.toml");
    std::fs::write(&pending, "").unwrap();
    let _ = std::fs::remove_file(&config);
    let mut child = Command::new(BIN)
        .args(["station", "--demo-fake-macs", "1", "--demo-step-ms", "1"])
        .args(["--exit-after", "1", "--config"])
        .arg(&config)
        .env("MACRESCUE_DATA_PENDING", &pending)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the station went on while the data partition was pending"
    );
    // The file shows up on the data partition, then the init says it is handled.
    std::fs::write(&config, "[station]\nno_such_setting = 1\n").unwrap();
    std::fs::remove_file(&pending).unwrap();
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("unknown setting station.no_such_setting"),
        "the config written during the wait was not read:\n{text}"
    );
    assert!(text.contains("station stopped: 1 Mac"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
