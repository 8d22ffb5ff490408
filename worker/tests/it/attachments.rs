//! Attachments: text inlined, PDF text extracted, other types refused by name.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lopdf::content::{Content, Operation};
use lopdf::{Document, Object, Stream, dictionary};
use shared::protocol::FileAttachment;

use crate::common::*;

/// A one-page PDF whose text is `text`, made with lopdf.
pub(crate) fn pdf_with_text(text: &str) -> Vec<u8> {
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font",
        "Subtype" => "Type1",
        "BaseFont" => "Courier",
    });
    let resources_id = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => font_id },
    });
    let content = Content {
        operations: vec![
            Operation::new("BT", vec![]),
            Operation::new("Tf", vec!["F1".into(), 12.into()]),
            Operation::new("Td", vec![72.into(), 700.into()]),
            Operation::new("Tj", vec![Object::string_literal(text)]),
            Operation::new("ET", vec![]),
        ],
    };
    let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode().unwrap()));
    let page_id = doc.add_object(dictionary! {
        "Type" => "Page",
        "Parent" => pages_id,
        "Contents" => content_id,
    });
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages",
            "Kids" => vec![page_id.into()],
            "Count" => 1,
            "Resources" => resources_id,
            "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! {
        "Type" => "Catalog",
        "Pages" => pages_id,
    });
    doc.trailer.set("Root", catalog_id);
    doc.compress();
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}

fn file(name: &str, content_type: &str, bytes: &[u8]) -> FileAttachment {
    FileAttachment {
        name: name.into(),
        content_type: content_type.into(),
        data: STANDARD.encode(bytes),
    }
}

#[tokio::test]
async fn text_and_pdf_attachments_reach_the_llm() {
    let env = Env::start().await;
    let _w = env.worker(|_| {}).await;
    let mut req = request(&unique("u"), "summarise these");
    req.files = vec![
        file("notes.txt", "text/plain", b"the launch is on Tuesday\n"),
        file(
            "config.json",
            "application/json; charset=utf-8",
            br#"{"replicas": 3}"#,
        ),
        file(
            "report.pdf",
            "application/pdf",
            &pdf_with_text("Quarterly revenue grew twelve percent"),
        ),
    ];
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);

    let msgs = env.llm.requests()[0].messages();
    let prompt = msgs.last().unwrap()["content"].as_str().unwrap().to_owned();
    assert!(prompt.starts_with("summarise these"), "{prompt}");
    assert!(prompt.contains("notes.txt"), "{prompt}");
    assert!(prompt.contains("the launch is on Tuesday"), "{prompt}");
    assert!(prompt.contains(r#"{"replicas": 3}"#), "{prompt}");
    assert!(prompt.contains("report.pdf"), "{prompt}");
    assert!(
        prompt.contains("Quarterly revenue grew twelve percent"),
        "{prompt}"
    );
    // History keeps the message as typed.
    let h = env.history(&req).await;
    assert_eq!(h[0].content, "summarise these");
}

#[tokio::test]
async fn unsupported_or_oversized_attachments_are_refused_naming_the_file() {
    let env = Env::start().await;
    let _w = env.worker(|c| c.max_files_bytes = Some(1000)).await;
    let user = unique("u");
    let mut frames = env.frames(&user).await;

    let mut req = request(&user, "what is this?");
    req.files = vec![
        file("ok.txt", "text/plain", b"fine"),
        file("photo.png", "image/png", b"\x89PNG\r\n"),
    ];
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.error");
    assert_eq!(seen.last["code"], "BAD_REQUEST");
    assert_eq!(seen.last["retryable"], false);
    assert_eq!(seen.last["request_id"], req.request_id.as_str());
    let message = seen.last["message"].as_str().unwrap();
    assert!(message.contains("photo.png"), "{message}");

    let mut big = request(&user, "and this?");
    big.files = vec![file("big.txt", "text/plain", &[b'a'; 1500])];
    env.publish(&big).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.last["code"], "BAD_REQUEST");
    assert!(
        seen.last["message"].as_str().unwrap().contains("too large"),
        "{}",
        seen.last
    );

    let mut fake = request(&user, "and this?");
    fake.files = vec![file("scan.pdf", "application/pdf", b"not a pdf at all")];
    env.publish(&fake).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.last["code"], "BAD_REQUEST");
    assert!(seen.last["message"].as_str().unwrap().contains("scan.pdf"));

    assert_eq!(env.llm.request_count(), 0);
    assert!(env.history(&req).await.is_empty());
    env.wait_queue_empty().await;
}

#[tokio::test]
async fn attachment_text_is_capped_per_request_and_the_prompt_says_so() {
    let env = Env::start().await;
    let _w = env.worker(|_| {}).await;
    let cap = worker::config::DEFAULT_MAX_FILES_TEXT_CHARS;
    let mut req = request(&unique("u"), "read these");
    req.files = vec![
        file("long.txt", "text/plain", "a".repeat(cap - 10).as_bytes()),
        file("more.txt", "text/plain", "b".repeat(cap).as_bytes()),
        file(
            "report.pdf",
            "application/pdf",
            &pdf_with_text("never reaches the prompt"),
        ),
    ];
    let mut frames = env.frames(&req.user_id).await;
    env.publish(&req).await;
    let seen = frames.until_end().await;
    assert_eq!(seen.kind(), "chat.complete", "{:?}", seen.last);

    let msgs = env.llm.requests()[0].messages();
    let prompt = msgs.last().unwrap()["content"].as_str().unwrap().to_owned();
    assert!(prompt.chars().count() < cap + 1000, "{}", prompt.len());
    assert_eq!(
        prompt.matches(&"b".repeat(10)).count(),
        1,
        "10 b's: one run"
    );
    assert!(!prompt.contains(&"b".repeat(11)));
    assert_eq!(
        prompt.matches(worker::attachments::TRUNCATED_NOTE).count(),
        2,
        "{}",
        &prompt[prompt.len() - 600..]
    );
    assert!(!prompt.contains("never reaches the prompt"));
}
