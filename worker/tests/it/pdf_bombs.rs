//! Hostile PDFs against the real worker binary (a separate process, as deployed):
//! decompression bombs that fit in one chat frame get a clear error or a bounded
//! reply, the worker keeps serving, and its peak memory, and its extractors', stay
//! under the bounds `worker::pdf` states. The files are generated here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lopdf::{Document, Object, Stream, dictionary};
use serde_json::Value;
use shared::protocol::FileAttachment;
use tokio::time::Instant;

use crate::common::*;

/// The worker's own peak RSS with bombs in flight: its baseline (~14 MiB measured)
/// plus decoded files and capped text (~15 MiB measured in all), with a wide
/// margin. Before the fix one bomb took it past 1.5 GB.
const WORKER_PEAK_RSS_KIB: u64 = 64 * 1024;
/// Bombs in flight at once: more than `PDF_MAX_CONCURRENT`, so some queue.
const COPIES: usize = 3;

/// A PDF whose pages all show one content stream of about `inflated` bytes of text
/// operators, compressed (object streams keep the page objects small too).
/// `every`: one line in `every` varies, which sets the compression ratio.
fn bomb(pages: usize, inflated: usize, every: usize) -> Vec<u8> {
    let mut content = b"BT /F1 12 Tf 72 700 Td\n".to_vec();
    let mut x: u64 = 12345;
    let mut i = 0;
    while content.len() < inflated {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if i % every == 0 {
            content.extend_from_slice(format!("({}) Tj\n", (x >> 33) % 100).as_bytes());
        } else {
            content.extend_from_slice(b"(x) Tj\n");
        }
        i += 1;
    }
    content.extend_from_slice(b"ET\n");

    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font",
        "Subtype" => "Type1",
        "BaseFont" => "Courier",
    });
    let mut stream = Stream::new(dictionary! {}, content);
    stream.compress().unwrap();
    let content_id = doc.add_object(stream);
    let kids: Vec<Object> = (0..pages)
        .map(|_| {
            doc.add_object(dictionary! {
                "Type" => "Page",
                "Parent" => pages_id,
                "Contents" => content_id,
            })
            .into()
        })
        .collect();
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages",
            "Count" => pages as i64,
            "Kids" => kids,
            "Resources" => dictionary! { "Font" => dictionary! { "F1" => font_id } },
            "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! {
        "Type" => "Catalog",
        "Pages" => pages_id,
    });
    doc.trailer.set("Root", catalog_id);
    let mut out = Vec::new();
    doc.save_modern(&mut out).unwrap();
    out
}

/// The review's bombs: (a) 8 MiB of operators shown on 780 pages in ~44 KB;
/// (b) ~1.9 MiB on 30 pages in ~10 KB.
fn bombs() -> [(&'static str, Vec<u8>); 2] {
    let big = bomb(780, 8 * 1024 * 1024, 205);
    let small = bomb(30, 1920 * 1024, 150);
    assert!((42_000..46_000).contains(&big.len()), "big: {}", big.len());
    assert!(
        (9_000..11_000).contains(&small.len()),
        "small: {}",
        small.len()
    );
    [("bomb-780.pdf", big), ("bomb-30.pdf", small)]
}

fn pdf_file(name: &str, bytes: &[u8]) -> FileAttachment {
    FileAttachment {
        name: name.into(),
        content_type: "application/pdf".into(),
        data: STANDARD.encode(bytes),
    }
}

/// The worker binary, configured like the in-process test workers.
struct Process {
    child: Child,
    admin: SocketAddr,
}

impl Process {
    fn start(env: &Env) -> Process {
        let admin: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
            .parse()
            .unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_worker"));
        c.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            c.env("PATH", path);
        }
        let child = c
            .envs([
                ("SB_ADMIN_LISTEN", admin.to_string()),
                ("SB_NODE_ID", unique("w")),
                ("SB_NATS_URL", env.nats.url()),
                ("SB_REDIS_URL", env.redis.url()),
                ("SB_REDIS_CLUSTER", env.redis.is_cluster().to_string()),
                ("SB_LLM_BASE_URL", env.llm.base_url()),
                ("SB_ACK_WAIT_SECS", ACK_WAIT_SECS.to_string()),
                ("SB_MAX_DELIVER", MAX_DELIVER.to_string()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker binary");
        Process { child, admin }
    }

    async fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(format!("http://{}/readyz", self.admin)).await
                && r.status().is_success()
            {
                return;
            }
            assert!(start.elapsed() < WAIT * 2, "worker process never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peaks seen in `/proc` while the test runs.
#[derive(Debug, Default, Clone)]
struct Peaks {
    /// The worker's VmHWM, KiB.
    worker_kib: u64,
    /// The largest VmHWM of any of its children (the extractors), KiB.
    child_kib: u64,
    /// Children seen.
    children: usize,
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A soft limit from `/proc/<pid>/limits`, e.g. "Max address space".
fn limit(pid: u32, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// The worker's children: every thread's (tokio spawns from any of them).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Samples `/proc` every millisecond until stopped (extractors of bombs live for
/// tens of milliseconds).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Peaks>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peaks = Peaks::default();
            let mut seen = std::collections::HashSet::new();
            while !s.load(Ordering::Relaxed) {
                if let Some(k) = status_kib(pid, "VmHWM:") {
                    peaks.worker_kib = peaks.worker_kib.max(k);
                }
                for child in children(pid) {
                    seen.insert(child);
                    if let Some(k) = status_kib(child, "VmHWM:") {
                        peaks.child_kib = peaks.child_kib.max(k);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            peaks.children = seen.len();
            peaks
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The last frame (`chat.complete` / `chat.error`) of each of `ids`.
async fn ends(frames: &mut Frames, ids: &[String]) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let deadline = Instant::now() + worker::pdf::PDF_QUEUE_TIMEOUT + WAIT * 3;
    while out.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = frames
            .next_within(left)
            .await
            .unwrap_or_else(|| panic!("no end for some of {ids:?}; got {out:?}"));
        if matches!(f["type"].as_str(), Some("chat.complete" | "chat.error")) {
            out.insert(f["request_id"].as_str().unwrap().to_owned(), f);
        }
    }
    out
}

#[tokio::test]
async fn pdf_bombs_leave_the_worker_process_bounded_and_serving() {
    let env = Env::start().await;
    let mut worker = Process::start(&env);
    worker.wait_ready().await;
    let pid = worker.child.id();
    let baseline = status_kib(pid, "VmHWM:").unwrap();
    let sampler = Sampler::start(pid);

    let user = unique("u");
    let mut frames = env.frames(&user).await;
    let mut sent = Vec::new();
    // Just under the stream cap, shown on 30 pages: read once, cut at the text cap.
    let heavy = bomb(30, 900 * 1024, 150);
    let [a, b] = bombs();
    for (name, bytes) in [a, b, ("heavy.pdf", heavy)] {
        for _ in 0..COPIES {
            let mut req = request(&user, "summarise this");
            req.files = vec![pdf_file(name, &bytes)];
            env.publish(&req).await;
            sent.push((req.request_id.clone(), name));
        }
    }
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    let ends = ends(&mut frames, &ids).await;
    for (id, name) in &sent {
        let f = &ends[id];
        match f["type"].as_str() {
            Some("chat.error") if *name != "heavy.pdf" => {
                let m = f["message"].as_str().unwrap();
                assert_eq!(f["code"], "BAD_REQUEST", "{f}");
                assert!(m.contains(name), "{m}");
                assert!(
                    m.contains("too large when decompressed") || m.contains("took too long"),
                    "{m}"
                );
            }
            Some("chat.complete") if *name == "heavy.pdf" => {}
            other => panic!("{name}: {other:?}: {f}"),
        }
    }
    // What reached the LLM is within the per-request cap, and says it was cut.
    let cap = worker::config::DEFAULT_MAX_FILES_TEXT_CHARS;
    assert_eq!(env.llm.request_count(), COPIES);
    for r in env.llm.requests() {
        let msgs = r.messages();
        let prompt = msgs.last().unwrap()["content"].as_str().unwrap();
        assert!(prompt.chars().count() < cap + 1000, "{}", prompt.len());
        assert!(prompt.contains(worker::attachments::TRUNCATED_NOTE));
    }

    // Still alive, and still serving PDFs and plain requests.
    assert!(worker.child.try_wait().unwrap().is_none(), "worker died");
    let mut ok = request(&user, "and this one?");
    ok.files = vec![pdf_file(
        "fine.pdf",
        &crate::attachments::pdf_with_text("Margins improved in March"),
    )];
    env.publish(&ok).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);
    let last = env.llm.requests().pop().unwrap().messages();
    let prompt = last.last().unwrap()["content"].as_str().unwrap().to_owned();
    assert!(prompt.contains("Margins improved in March"), "{prompt}");

    let peaks = sampler.finish();
    let outcomes: Vec<(&str, &str)> = sent
        .iter()
        .map(|(id, name)| (*name, ends[id]["type"].as_str().unwrap()))
        .collect();
    eprintln!(
        "worker VmHWM {baseline} KiB at start, {} KiB peak; extractors: {} seen, peak VmHWM {} KiB; outcomes {outcomes:?}",
        peaks.worker_kib, peaks.children, peaks.child_kib
    );
    assert!(worker.child.try_wait().unwrap().is_none(), "worker died");
    assert!(
        peaks.worker_kib < WORKER_PEAK_RSS_KIB,
        "worker peak RSS {} KiB",
        peaks.worker_kib
    );
    assert!(peaks.children >= 1, "no extractor process seen");
    assert!(
        peaks.child_kib * 1024 < worker::pdf::PDF_EXTRACTOR_MEMORY,
        "extractor peak {} KiB",
        peaks.child_kib
    );
}

#[tokio::test]
async fn the_extractor_caps_its_own_memory_and_cpu_before_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg(worker::pdf::EXTRACTOR_ARG)
        .arg("1000")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    // stdin still open: it has set its limits and waits for the PDF.
    let start = Instant::now();
    while limit(pid, "Max address space") != Some(worker::pdf::PDF_EXTRACTOR_MEMORY) {
        assert!(
            start.elapsed() < WAIT,
            "{:?}",
            std::fs::read_to_string(format!("/proc/{pid}/limits"))
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        limit(pid, "Max cpu time"),
        Some(worker::pdf::PDF_EXTRACTOR_CPU_SECS)
    );
    assert_eq!(limit(pid, "Max core file size"), Some(0));

    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bombs()[0].1).await.unwrap();
    drop(stdin);
    let mut reply = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut reply)
        .await
        .unwrap();
    assert!(child.wait().await.unwrap().success());
    assert_eq!(
        worker::pdf::decode_reply(&reply),
        Err(worker::pdf::PdfError::TooLarge)
    );
}
