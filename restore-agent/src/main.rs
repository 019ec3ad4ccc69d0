//! `restore-agent`: the command-line edge. Parses arguments, sets up logging, and hands off to
//! the library. `anyhow` lives here and nowhere else.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "restore-agent",
    version,
    about = "Revive or restore an Apple Silicon Mac over USB"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List connected Apple devices (mode, model, board, ECID, nonces).
    Devices(cmd::devices::Args),
    /// Identify a Mac from its USB serial string, without a device.
    Identify(cmd::identify::Args),
    /// Walk a Mac from DFU through iBSS and iBEC to `bootx`, using already-personalized images.
    Bootchain(cmd::bootchain::Args),
    /// Show what a restore would do: identity, components per stage, the main TSS request.
    Plan(cmd::plan::Args),
    /// List the macOS builds offered for a model, newest first (optionally: signed or not).
    Firmwares(cmd::firmwares::Args),
    /// Restore every Mac plugged in, with a dashboard and a report per Mac (the image runs this).
    Station(Box<cmd::station::Args>),
    /// Download a firmware file into the cache (parallel, resumable, SHA-1 checked).
    Download(cmd::download::Args),
    /// Wait for a Mac and restore it: revive first; erase only after the code shown is typed.
    Restore(cmd::restore::Args),
    /// Bring up networking as the rescue image does and print its status (JSON lines).
    Net(cmd::net::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Devices(a) => cmd::devices::run(a),
        Command::Identify(a) => cmd::identify::run(a),
        Command::Bootchain(a) => cmd::bootchain::run(a),
        Command::Plan(a) => cmd::plan::run(a),
        Command::Firmwares(a) => cmd::firmwares::run(a),
        Command::Station(a) => cmd::station::run(*a),
        Command::Download(a) => cmd::download::run(a),
        Command::Restore(a) => cmd::restore::run(a),
        Command::Net(a) => cmd::net::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, never a backtrace: a technician reads this, and
            // RUST_BACKTRACE left set in a shell must not bury the message.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: serial consoles and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
