//! push-dispatcher, first step: the VAPID public key (generated once and kept
//! in the store, or configured) and the push-subscription API.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rt_core::Context;
use rt_tests::{Engines, TestApp, distributed_settings, error_code};
use serde_json::{Value, json};
use sqlx::Connection;

/// A P-256 key pair made with `openssl ecparam -name prime256v1 -genkey`:
/// the raw private scalar and the uncompressed public point, base64url.
const VAPID_PRIVATE: &str = "s10k1Lcfq5B_klwCz-_Jdy7JQfUM2XXBJV4I627oYlg";
const VAPID_PUBLIC: &str =
    "BLjhA0ocLA-PrZjGKV7kqslj3hlGLndroNnPf_diQTK5YqPunqIXOzlH-jrR-EtAOsUFrH80gDhbcKkieUADZXI";

/// A browser's subscription keys: those of the example in RFC 8291, section 5.
const P256DH: &str =
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

const ENDPOINT: &str = "https://push.example.net/wpush/v2/abc123";

fn subscription(endpoint: &str, topics: Value) -> Value {
    json!({
        "endpoint": endpoint,
        "expirationTime": null,
        "keys": {"p256dh": P256DH, "auth": AUTH},
        "topics": topics,
    })
}

async fn public_key(app: &TestApp) -> String {
    let (status, body) = app.get_json("/v1/push/vapid-public-key").await;
    assert_eq!(status, 200, "{body}");
    let key = body["publicKey"].as_str().expect("publicKey").to_owned();
    let bytes = URL_SAFE_NO_PAD
        .decode(&key)
        .expect("base64url without padding");
    assert_eq!(bytes.len(), 65, "an uncompressed P-256 point");
    assert_eq!(bytes[0], 0x04, "an uncompressed P-256 point");
    key
}

async fn register(app: &TestApp, body: &Value, token: Option<&str>) -> reqwest::Response {
    let mut req = app.http.post(app.url("/v1/push/subscriptions")).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn list(app: &TestApp, token: Option<&str>) -> Value {
    let mut req = app.http.get(app.url("/v1/push/subscriptions"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn delete(app: &TestApp, id: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = app
        .http
        .delete(app.url(&format!("/v1/push/subscriptions/{id}")));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn count(db_url: &str, table: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(db_url).await.unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_generated_key_is_shared_by_replicas_and_survives_a_restart() {
    let mut first = TestApp::spawn(Engines::Distributed, |_| {}).await;
    let db_url = first.db.as_ref().unwrap().url.clone();
    let prefix = first.prefix.clone();
    // A second service over the same, still keyless, database.
    let ctx = Context::connect(distributed_settings(&db_url, &prefix))
        .await
        .unwrap();
    let second = TestApp::serve(ctx, prefix.clone(), None, None);

    // Both start generating at once (each HTTP worker loads the key on its
    // first request): they must all end up with the one stored first.
    let asks = (0..8).map(|i| public_key(if i % 2 == 0 { &first } else { &second }));
    let keys = futures_util::future::join_all(asks).await;
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "every replica serves the same key: {keys:?}"
    );
    assert_eq!(count(&db_url, "rt_vapid_keys").await, 1);

    // Restart over the same database: the same key.
    let db = first.db.take().unwrap();
    first.stop().await;
    second.stop().await;
    drop((first, second));
    let ctx = Context::connect(distributed_settings(&db.url, &prefix))
        .await
        .unwrap();
    let app = TestApp::serve(ctx, prefix, Some(db), None);
    assert_eq!(public_key(&app).await, keys[0]);
}

#[tokio::test]
async fn a_configured_private_key_gives_its_public_key_and_is_not_stored() {
    let app = TestApp::spawn(Engines::Distributed, |s| {
        s.vapid_private_key = Some(VAPID_PRIVATE.into());
    })
    .await;
    assert_eq!(public_key(&app).await, VAPID_PUBLIC);
    assert_eq!(
        count(&app.db.as_ref().unwrap().url, "rt_vapid_keys").await,
        0
    );
}

#[tokio::test]
async fn the_embedded_default_keeps_its_generated_key() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    let key = public_key(&app).await;
    assert_ne!(key, VAPID_PUBLIC);
    assert_eq!(public_key(&app).await, key);
}

/// Register, register the same endpoint again (an update, same id), list,
/// delete.
async fn register_update_list_delete(app: &TestApp) {
    let res = register(app, &subscription(ENDPOINT, json!(["news", "chat"])), None).await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = res.json().await.unwrap();
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(location, format!("/v1/push/subscriptions/{id}"));
    assert_eq!(created["endpoint"], ENDPOINT);
    assert_eq!(created["topics"], json!(["chat", "news"]));
    assert_eq!(created["noticeOnly"], false);
    assert!(created["createdAt"].is_string() && created["updatedAt"].is_string());
    assert!(
        created.get("keys").is_none() && !created.to_string().contains(AUTH),
        "the keys are never echoed: {created}"
    );

    // The same endpoint again (keys given with padding this time): updated.
    let mut again = subscription(ENDPOINT, json!(["alerts", "news", "alerts"]));
    again["noticeOnly"] = json!(true);
    again["keys"]["auth"] = json!(format!("{AUTH}=="));
    again["expirationTime"] = json!(1_900_000_000_000_u64);
    let res = register(app, &again, None).await;
    assert_eq!(res.status(), 200);
    let updated: Value = res.json().await.unwrap();
    assert_eq!(updated["id"], id.as_str(), "an update keeps the id");
    assert_eq!(updated["topics"], json!(["alerts", "news"]));
    assert_eq!(updated["noticeOnly"], true);
    assert_eq!(updated["createdAt"], created["createdAt"]);
    assert!(updated["updatedAt"].as_str() >= created["updatedAt"].as_str());

    let other = "https://fcm.googleapis.com/fcm/send/other-device";
    let res = register(app, &subscription(other, json!(["news"])), None).await;
    assert_eq!(res.status(), 201);
    let second: Value = res.json().await.unwrap();
    assert_ne!(second["id"], id.as_str());

    let listed = list(app, None).await;
    let subs = listed["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 2, "no duplicate for the re-registered endpoint");
    assert_eq!(subs[0], updated, "the list shows the update");
    assert_eq!(subs[1], second);

    assert_eq!(delete(app, &id, None).await.status(), 204);
    let res = delete(app, &id, None).await;
    assert_eq!(
        error_code(res).await,
        (404, "subscription_not_found".into())
    );
    let res = delete(app, "no-such-id", None).await;
    assert_eq!(
        error_code(res).await,
        (404, "subscription_not_found".into())
    );
    let listed = list(app, None).await;
    assert_eq!(listed["subscriptions"], json!([second]));

    // Registering a deleted endpoint again makes a new subscription.
    let res = register(app, &subscription(ENDPOINT, json!(["news"])), None).await;
    assert_eq!(res.status(), 201);
    let fresh: Value = res.json().await.unwrap();
    assert_ne!(fresh["id"], id.as_str());
}

#[tokio::test]
async fn subscriptions_register_update_list_delete() {
    let app = TestApp::spawn(Engines::Distributed, |_| {}).await;
    register_update_list_delete(&app).await;
    // What the store holds: one row per endpoint, one per (endpoint, topic).
    let url = &app.db.as_ref().unwrap().url;
    assert_eq!(count(url, "rt_push_subscriptions").await, 2);
    assert_eq!(count(url, "rt_push_topics").await, 2);
}

#[tokio::test]
async fn subscriptions_register_update_list_delete_embedded() {
    let app = TestApp::spawn(Engines::Embedded, |_| {}).await;
    register_update_list_delete(&app).await;
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn bad_subscriptions_are_refused_and_store_nothing() {
    let app = TestApp::spawn(Engines::Distributed, |s| s.max_topics = 3).await;
    let point = URL_SAFE_NO_PAD.decode(P256DH).unwrap();
    let mut off_curve = point.clone();
    off_curve[64] ^= 1;
    let mut compressed = point[..33].to_vec();
    compressed[0] = 0x02;
    let long = format!("https://push.example.net/{}", "x".repeat(2048));
    let too_long = point.iter().chain([&0]).copied().collect::<Vec<u8>>();

    // (what, the field as a JSON pointer, its new value or None to remove it, code)
    let cases: Vec<(&str, &str, Option<Value>, &str)> = vec![
        ("no endpoint", "/endpoint", None, "invalid_endpoint"),
        (
            "http endpoint",
            "/endpoint",
            Some(json!("http://push.example.net/x")),
            "invalid_endpoint",
        ),
        (
            "ftp endpoint",
            "/endpoint",
            Some(json!("ftp://push.example.net/x")),
            "invalid_endpoint",
        ),
        (
            "relative endpoint",
            "/endpoint",
            Some(json!("/wpush/abc")),
            "invalid_endpoint",
        ),
        (
            "not a URL",
            "/endpoint",
            Some(json!("push service")),
            "invalid_endpoint",
        ),
        (
            "credentials",
            "/endpoint",
            Some(json!("https://u:p@push.example.net/x")),
            "invalid_endpoint",
        ),
        (
            "endpoint too long",
            "/endpoint",
            Some(json!(long)),
            "invalid_endpoint",
        ),
        (
            "endpoint not a string",
            "/endpoint",
            Some(json!(42)),
            "invalid_body",
        ),
        ("no keys", "/keys", None, "invalid_keys"),
        ("no auth", "/keys/auth", None, "invalid_keys"),
        ("no p256dh", "/keys/p256dh", None, "invalid_keys"),
        (
            "p256dh 64 bytes",
            "/keys/p256dh",
            Some(json!(b64(&point[..64]))),
            "invalid_keys",
        ),
        (
            "p256dh 66 bytes",
            "/keys/p256dh",
            Some(json!(b64(&too_long))),
            "invalid_keys",
        ),
        (
            "p256dh compressed",
            "/keys/p256dh",
            Some(json!(b64(&compressed))),
            "invalid_keys",
        ),
        (
            "p256dh off the curve",
            "/keys/p256dh",
            Some(json!(b64(&off_curve))),
            "invalid_keys",
        ),
        (
            "p256dh undecodable",
            "/keys/p256dh",
            Some(json!("not*base64!")),
            "invalid_keys",
        ),
        (
            "auth 15 bytes",
            "/keys/auth",
            Some(json!(b64(&[7; 15]))),
            "invalid_keys",
        ),
        (
            "auth 17 bytes",
            "/keys/auth",
            Some(json!(b64(&[7; 17]))),
            "invalid_keys",
        ),
        (
            "auth undecodable",
            "/keys/auth",
            Some(json!("@@@@")),
            "invalid_keys",
        ),
        ("no topics", "/topics", None, "missing_topic"),
        ("empty topics", "/topics", Some(json!([])), "missing_topic"),
        (
            "invalid topic",
            "/topics",
            Some(json!(["news", "a..b"])),
            "invalid_topic",
        ),
        (
            "too many topics",
            "/topics",
            Some(json!(["a", "b", "c", "d"])),
            "too_many_topics",
        ),
        (
            "topics not a list",
            "/topics",
            Some(json!("news")),
            "invalid_body",
        ),
        (
            "unknown field",
            "/notice_only",
            Some(json!(true)),
            "invalid_body",
        ),
        (
            "negative expiry",
            "/expirationTime",
            Some(json!(-5)),
            "invalid_body",
        ),
    ];
    for (what, pointer, value, code) in cases {
        let mut body = subscription(ENDPOINT, json!(["news"]));
        let (parent, field) = pointer.rsplit_once('/').unwrap();
        let parent = body.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        match value {
            Some(v) => parent.insert(field.to_owned(), v),
            None => parent.remove(field),
        };
        let res = register(&app, &body, None).await;
        assert_eq!(error_code(res).await, (400, code.into()), "{what}");
    }
    for (what, raw) in [("malformed JSON", "{\"endpoint\": "), ("empty body", "")] {
        let res = app
            .http
            .post(app.url("/v1/push/subscriptions"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(res).await,
            (400, "invalid_json".into()),
            "{what}"
        );
    }

    assert_eq!(list(&app, None).await, json!({"subscriptions": []}));
    let url = &app.db.as_ref().unwrap().url;
    assert_eq!(count(url, "rt_push_subscriptions").await, 0);
    assert_eq!(count(url, "rt_push_topics").await, 0);

    // Literal internal addresses are refused, whatever the scheme.
    for endpoint in [
        "https://127.0.0.1/push/1",
        "https://10.0.0.7:8443/push/1",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/push/1",
        "https://[::ffff:192.168.0.1]/push/1",
    ] {
        let res = register(&app, &subscription(endpoint, json!(["news"])), None).await;
        let (status, body) = (res.status(), res.text().await.unwrap());
        assert_eq!(status, 400, "{endpoint}: {body}");
        assert!(
            body.contains("invalid_endpoint") && body.contains("not a public address"),
            "{endpoint}: {body}"
        );
    }
    assert_eq!(count(url, "rt_push_subscriptions").await, 0);

    // http:// endpoints (a local push-service emulator) only with the setting;
    // a loopback one also needs private addresses allowed.
    let insecure = TestApp::spawn(Engines::Embedded, |s| {
        s.push_allow_insecure_endpoints = true;
    })
    .await;
    let body = subscription("http://127.0.0.1:9/push/1", json!(["news"]));
    let res = register(&insecure, &body, None).await;
    assert_eq!(error_code(res).await, (400, "invalid_endpoint".into()));
    let local = TestApp::spawn(Engines::Embedded, |s| {
        s.push_allow_insecure_endpoints = true;
        s.push_allow_private_addresses = true;
    })
    .await;
    assert_eq!(register(&local, &body, None).await.status(), 201);
    let body = subscription("ftp://127.0.0.1:9/push/1", json!(["news"]));
    let res = register(&insecure, &body, None).await;
    assert_eq!(error_code(res).await, (400, "invalid_endpoint".into()));
}

const SECRET: &str = rt_tests::JWT_SECRET;

fn token(subject: &str, subscribe: &[&str]) -> String {
    rt_tests::jwt(SECRET, 300, json!({"sub": subject, "subscribe": subscribe}))
}

#[tokio::test]
async fn subscriptions_need_rights_and_belong_to_their_subject() {
    let app = TestApp::spawn(Engines::Distributed, |s| {
        s.jwt_secret = Some(SECRET.into());
    })
    .await;
    let alice = token("alice", &["news.>"]);
    let bob = token("bob", &[">"]);

    let res = register(&app, &subscription(ENDPOINT, json!(["news.eu"])), None).await;
    assert_eq!(error_code(res).await, (401, "missing_token".into()));
    let body = subscription(ENDPOINT, json!(["news.eu", "sports"]));
    let res = register(&app, &body, Some(&alice)).await;
    assert_eq!(error_code(res).await, (403, "forbidden".into()));
    assert_eq!(
        list(&app, Some(&alice)).await,
        json!({"subscriptions": []}),
        "a refused registration stores nothing"
    );

    let res = register(
        &app,
        &subscription(ENDPOINT, json!(["news.eu"])),
        Some(&alice),
    )
    .await;
    assert_eq!(res.status(), 201);
    let alices: Value = res.json().await.unwrap();
    let id = alices["id"].as_str().unwrap().to_owned();

    // Bob sees none of Alice's subscriptions and cannot delete them.
    assert_eq!(list(&app, Some(&bob)).await, json!({"subscriptions": []}));
    let res = delete(&app, &id, Some(&bob)).await;
    assert_eq!(
        error_code(res).await,
        (404, "subscription_not_found".into())
    );
    // Nor take her endpoint over without the browser's auth secret.
    let mut forged = subscription(ENDPOINT, json!(["sports"]));
    forged["keys"]["auth"] = json!(b64(&[9; 16]));
    let res = register(&app, &forged, Some(&bob)).await;
    assert_eq!(error_code(res).await, (403, "forbidden".into()));
    assert_eq!(
        list(&app, Some(&alice)).await,
        json!({"subscriptions": [alices]})
    );

    // The browser itself (same keys) moving to Bob takes it over: same id.
    let res = register(&app, &subscription(ENDPOINT, json!(["sports"])), Some(&bob)).await;
    assert_eq!(res.status(), 200);
    let bobs: Value = res.json().await.unwrap();
    assert_eq!(bobs["id"], id.as_str());
    assert_eq!(list(&app, Some(&alice)).await, json!({"subscriptions": []}));
    assert_eq!(
        list(&app, Some(&bob)).await,
        json!({"subscriptions": [bobs]})
    );
    assert_eq!(delete(&app, &id, Some(&bob)).await.status(), 204);

    // The public key needs no token: a page asks for it before subscribing.
    public_key(&app).await;
}
