//! The `iamproxy` command: parse arguments, load and check the configuration, serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iamproxy::{config::Config, observe::logging};

mod demo;

#[derive(Parser)]
#[command(
    name = "iamproxy",
    version = iamproxy::LONG_VERSION,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// The TOML configuration file; `${NAME}` in its string values is read from the
    /// environment.
    #[arg(long, short, value_name = "FILE", env = "IAMPROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 1 with the key and reason.
    #[arg(long, requires = "config")]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with built-in loopback stand-ins for Rails, IAM and the
    /// pre-authorize backend.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8181")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9229")]
        admin_listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the runtime: {error}")),
    };
    match (cli.command, cli.config) {
        (
            Some(Command::Demo {
                listen,
                admin_listen,
            }),
            _,
        ) => match runtime.block_on(demo::run(listen, admin_listen)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&error.to_string()),
        },
        (None, Some(path)) => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(error) => return fail(&error.to_string()),
            };
            if cli.check {
                println!("{}: configuration is valid", path.display());
                return ExitCode::SUCCESS;
            }
            let logging = logging::init(&config.log);
            let (log_level, flush) = logging
                .map(|installed| (installed.level, installed.flush))
                .unzip();
            let serve = async {
                iamproxy::run(&path, config, log_level, iamproxy::shutdown_signal()).await
            };
            let served = runtime.block_on(serve);
            // The last log lines, before anything else is printed.
            drop(runtime);
            drop(flush);
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error.to_string()),
            }
        }
        (None, None) => fail(
            "--config FILE (or IAMPROXY_CONFIG) is required (or run `iamproxy demo`); see --help",
        ),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("iamproxy: {message}");
    ExitCode::FAILURE
}
