//! Log lines reach stderr in batches, written by a thread of their own.
//!
//! Writing each line with its own `write(2)` cost about 7% of the CPU of an OAuth request
//! (two lines each). Here a request appends its line to a buffer and goes on; the writer
//! thread wakes when the buffer stops being empty, lets a millisecond's worth of lines
//! gather, and writes them with one call.
//!
//! Nothing is dropped. When the buffer holds more than [`BACKLOG_LIMIT`] bytes (stderr is
//! slow or blocked) the request writes the backlog and its line itself, which slows it down
//! as a direct write would. [`Flush`] writes what is left when the process stops, and lines
//! logged after that are written directly. Only a process killed outright loses the last
//! millisecond of lines.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer thread lets lines gather after the first one of a batch.
const GATHER: Duration = Duration::from_millis(1);

/// Buffered bytes above which a request writes the backlog itself instead of waiting for
/// the writer thread.
pub const BACKLOG_LIMIT: usize = 4 << 20;

struct Shared<W> {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Held while writing to `sink`, taken after `pending` so lines keep their order.
    sink: Mutex<W>,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Set by [`Flush`]: the writer thread is gone, lines go straight to the sink.
    closed: bool,
}

/// The [`MakeWriter`] the log subscriber writes through.
pub struct LogWriter<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for LogWriter<W> {
    fn clone(&self) -> Self {
        LogWriter {
            shared: self.shared.clone(),
        }
    }
}

/// Writes what is buffered and stops the writer thread when dropped.
#[must_use = "dropping it stops batching; keep it until the process exits"]
pub struct Flush<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread for `sink`. If the thread cannot start, lines are written
/// directly.
pub fn batched<W: Write + Send + 'static>(sink: W) -> (LogWriter<W>, Flush<W>) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        sink: Mutex::new(sink),
    });
    let for_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name("iamproxy-log".into())
        .spawn(move || write_batches(&for_thread))
        .ok();
    if thread.is_none() {
        lock(&shared.pending).closed = true;
    }
    let writer = LogWriter {
        shared: shared.clone(),
    };
    (writer, Flush { shared, thread })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain bytes behind; they are still worth writing.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The writer thread: wait for lines, let more gather, write them all at once.
fn write_batches<W: Write>(shared: &Shared<W>) {
    let mut batch = Vec::new();
    loop {
        {
            let mut pending = lock(&shared.pending);
            while pending.bytes.is_empty() && !pending.closed {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if pending.closed {
                return;
            }
        }
        std::thread::sleep(GATHER);
        let mut pending = lock(&shared.pending);
        std::mem::swap(&mut pending.bytes, &mut batch);
        let mut sink = lock(&shared.sink);
        drop(pending);
        // Nowhere to report a failed log write; the next batch tries again.
        let _ = sink.write_all(&batch).and_then(|()| sink.flush());
        drop(sink);
        batch.clear();
    }
}

impl<W: Write + Send + 'static> Drop for Flush<W> {
    fn drop(&mut self) {
        {
            let mut pending = lock(&self.shared.pending);
            pending.closed = true;
            let mut sink = lock(&self.shared.sink);
            let _ = sink.write_all(&pending.bytes).and_then(|()| sink.flush());
            pending.bytes = Vec::new();
        }
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One log line's writer: appends to the shared buffer.
pub struct LineWriter<'a, W> {
    shared: &'a Shared<W>,
}

impl<W: Write> Write for LineWriter<'_, W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = lock(&self.shared.pending);
        if pending.closed || pending.bytes.len() + line.len() > BACKLOG_LIMIT {
            let mut sink = lock(&self.shared.sink);
            sink.write_all(&pending.bytes)?;
            pending.bytes.clear();
            sink.write_all(line)?;
            sink.flush()?;
            return Ok(line.len());
        }
        let was_empty = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        // Only the first line of a batch wakes the thread: one wake-up per batch.
        if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for LogWriter<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records every write call, and can be made to block.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let (closed, opened) = &*self.gate;
            let mut closed = closed.lock().unwrap();
            while *closed {
                closed = opened.wait(closed).unwrap();
            }
            if !bytes.is_empty() {
                self.writes.lock().unwrap().push(bytes.to_vec());
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }
        fn writes(&self) -> usize {
            self.writes.lock().unwrap().len()
        }
        fn set_blocked(&self, blocked: bool) {
            *self.gate.0.lock().unwrap() = blocked;
            self.gate.1.notify_all();
        }
    }

    fn log(writer: &LogWriter<Recorder>, line: &str) {
        writer.make_writer().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn every_line_from_every_thread_arrives_whole_and_in_order_in_few_writes() {
        let sink = Recorder::default();
        let (writer, flush) = batched(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for line in 0..20_000 {
                        log(&writer, &format!("thread {thread} line {line}\n"));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(flush);

        let text = sink.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut words = line.split(' ');
            assert_eq!(words.next(), Some("thread"), "{line:?}");
            let thread: usize = words.next().unwrap().parse().unwrap();
            assert_eq!(words.next(), Some("line"), "{line:?}");
            let number: usize = words.next().unwrap().parse().unwrap();
            assert_eq!(number, next[thread], "thread {thread} out of order");
            next[thread] += 1;
        }
        assert_eq!(next, [20_000; 4], "every line arrived");
        assert!(
            sink.writes() < 80_000 / 10,
            "batched: {} writes for 80000 lines",
            sink.writes()
        );
    }

    #[test]
    fn a_backlog_over_the_limit_makes_the_logging_thread_wait_and_loses_nothing() {
        let sink = Recorder::default();
        let (writer, flush) = batched(sink.clone());
        // stderr stalls: the writer thread blocks writing the first line.
        sink.set_blocked(true);
        log(&writer, "first\n");
        while !lock(&writer.shared.pending).bytes.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let line = format!("{}\n", "x".repeat(1023));
        let lines = BACKLOG_LIMIT / line.len() + 8;
        let logger = {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for _ in 0..lines {
                    log(&writer, &line);
                }
                log(&writer, "last\n");
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!logger.is_finished(), "past the limit, logging waits");
        sink.set_blocked(false);
        logger.join().unwrap();
        drop(flush);
        let text = sink.text();
        assert!(text.starts_with("first\n"));
        assert!(text.ends_with("last\n"));
        assert_eq!(text.lines().count(), lines + 2);
    }

    #[test]
    fn lines_after_the_flush_are_written_directly() {
        let sink = Recorder::default();
        let (writer, flush) = batched(sink.clone());
        log(&writer, "before\n");
        drop(flush);
        assert_eq!(sink.text(), "before\n", "flushed at drop");
        log(&writer, "after\n");
        assert_eq!(sink.text(), "before\nafter\n");
    }
}
