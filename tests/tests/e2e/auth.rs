//! JWT auth on publish: missing, expired, wrongly signed and under-privileged
//! tokens are refused; tokens travel in a header, a cookie or the query.

use jsonwebtoken::{EncodingKey, Header, encode};
use rt_tests::{Engines, TestApp, error_code};
use serde_json::{Value, json};
use sqlx::Row;

const SECRET: &str = rt_tests::JWT_SECRET;

fn token(secret: &str, exp_offset: i64, publish: &[&str]) -> String {
    rt_tests::jwt(
        secret,
        exp_offset,
        json!({"sub": "tester", "publish": publish, "subscribe": ["*"]}),
    )
}

#[tokio::test]
async fn publish_checks_the_token_and_its_topic_patterns() {
    let app = TestApp::spawn(Engines::Distributed, |s| s.jwt_secret = Some(SECRET.into())).await;
    let post = |topic: &str, auth: Option<String>| {
        let mut req = app
            .http
            .post(app.url(&format!("/v1/topics/{topic}/events")))
            .json(&json!({"data": 1}));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req.send()
    };
    let good = token(SECRET, 300, &["chat.>", "news"]);
    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("news", None, 401, "missing_token"),
        (
            "news",
            Some(format!("Bearer {}", token(SECRET, -600, &["news"]))),
            401,
            "token_expired",
        ),
        (
            "news",
            Some(format!(
                "Bearer {}",
                token("another-secret-also-32-bytes-lo", 300, &["news"])
            )),
            401,
            "invalid_token",
        ),
        (
            "news",
            Some("Bearer not.a.jwt".into()),
            401,
            "invalid_token",
        ),
        ("news", Some(format!("Basic {good}")), 401, "missing_token"),
        ("sports", Some(format!("Bearer {good}")), 403, "forbidden"),
        ("chat", Some(format!("Bearer {good}")), 403, "forbidden"),
    ];
    for (topic, auth, status, code) in cases {
        let shown = auth
            .as_deref()
            .map(|a| a.chars().take(20).collect::<String>());
        let res = post(topic, auth).await.unwrap();
        assert_eq!(
            error_code(res).await,
            (status, code.into()),
            "{topic} with {shown:?}"
        );
    }
    // A batch with one forbidden topic stores nothing.
    let res = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(&good)
        .json(&json!([{"topic": "news", "data": 1}, {"topic": "sports", "data": 2}]))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await, (403, "forbidden".into()));
    let mut conn = app.db.as_ref().unwrap().connect().await;
    let stored: i64 = sqlx::query("SELECT count(*) FROM rt_events")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);

    // Allowed: header, cookie, query parameter.
    assert_eq!(
        post("chat.room-1", Some(format!("Bearer {good}")))
            .await
            .unwrap()
            .status(),
        201
    );
    let by_cookie = app
        .http
        .post(app.url("/v1/topics/news/events"))
        .header("Cookie", format!("rt_token={good}"))
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_cookie.status(), 201);
    let by_query = app
        .http
        .post(app.url(&format!("/v1/topics/news/events?access_token={good}")))
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 201);
    assert_eq!(by_query.json::<Value>().await.unwrap()["seq"], 2);
}

#[tokio::test]
async fn a_non_loopback_bind_without_a_key_refuses_to_start() {
    let dir = rt_tests::TempDir::new();
    let settings = rt_core::config::Settings {
        bind: "0.0.0.0:0".into(),
        ..rt_tests::embedded_settings(&dir.0)
    };
    let err = rt_core::Context::connect(settings)
        .await
        .expect_err("must refuse");
    assert!(err.to_string().contains("--allow-anonymous"), "{err}");
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A token signed with a private key of `tests/fixtures`.
fn signed(alg: jsonwebtoken::Algorithm, private_pem: &str) -> String {
    let pem = std::fs::read(fixture(private_pem)).unwrap();
    let key = match alg {
        jsonwebtoken::Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let exp = chrono::Utc::now().timestamp() + 300;
    let claims = json!({"sub": "k", "exp": exp, "publish": ["news"], "subscribe": ["news"]});
    encode(&Header::new(alg), &claims, &key).unwrap()
}

async fn public_key_tokens_verify(public: &str, alg: jsonwebtoken::Algorithm, private: &str) {
    let app = TestApp::spawn(Engines::Embedded, |s| {
        s.jwt_public_key = Some(fixture(public));
    })
    .await;
    let post = |token: String| {
        app.http
            .post(app.url("/v1/topics/news/events"))
            .bearer_auth(token)
            .json(&json!({"data": 1}))
            .send()
    };
    let good = post(signed(alg, private)).await.unwrap();
    assert_eq!(good.status(), 201, "a token signed with the matching key");
    // The other algorithm's key, and an HS256 token, are refused.
    let (other_alg, other_key) = match alg {
        jsonwebtoken::Algorithm::ES256 => (jsonwebtoken::Algorithm::RS256, "rs256-private.pem"),
        _ => (jsonwebtoken::Algorithm::ES256, "es256-private.pem"),
    };
    let res = post(signed(other_alg, other_key)).await.unwrap();
    assert_eq!(error_code(res).await, (401, "invalid_token".into()));
    let res = post(token(SECRET, 300, &["news"])).await.unwrap();
    assert_eq!(error_code(res).await, (401, "invalid_token".into()));
    // Polling checks the same token.
    let res = app
        .http
        .get(app.url("/v1/topics/news/events"))
        .bearer_auth(signed(alg, private))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn es256_tokens_verify_with_the_configured_public_key() {
    public_key_tokens_verify(
        "es256-public.pem",
        jsonwebtoken::Algorithm::ES256,
        "es256-private.pem",
    )
    .await;
}

#[tokio::test]
async fn rs256_tokens_verify_with_the_configured_public_key() {
    public_key_tokens_verify(
        "rs256-public.pem",
        jsonwebtoken::Algorithm::RS256,
        "rs256-private.pem",
    )
    .await;
}
