//! The OTLP/HTTP trace receiver of the tests (tests/support/otlp.rs) as a process, for the
//! end-to-end suite (tests/e2e/lib/otlp.js): the gateway and the instrumented IAM server
//! export to it, and the suite reads what it holds at `GET /spans`.
//!
//!   cargo build --example otlp_receiver && target/debug/examples/otlp_receiver
//!
//! Listens on 127.0.0.1 (a port picked by the system) and prints exactly one line to
//! stdout, `otlp_receiver listening http://127.0.0.1:PORT/v1/traces`; then one line per
//! span received to stderr. Runs until killed or until its standard input is closed (so a
//! test process that dies takes it along when it holds the pipe).
#[path = "../tests/support/otlp.rs"]
mod otlp;

use std::io::{Read, Write};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let collector = otlp::Collector::start().await;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "otlp_receiver listening {}", collector.endpoint()).unwrap();
        stdout.flush().unwrap();
    }

    // End of input (or an error reading it): the parent is gone, or asks us to stop.
    let (closed, mut stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });

    // What arrives, to stderr, for the suite's log; the last spans too when told to stop.
    let mut shown = 0;
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
            _ = &mut stdin_closed => true,
        };
        let spans = collector.spans();
        for span in &spans[shown.min(spans.len())..] {
            eprintln!("otlp_receiver: {span}");
        }
        shown = spans.len();
        if stop {
            return;
        }
    }
}
