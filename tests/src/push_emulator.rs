//! A Web Push service emulator (RFC 8030) for end-to-end tests: an HTTP
//! server on 127.0.0.1 that stands in for a browser vendor's push service and
//! that `push-dispatcher` POSTs encrypted messages to.
//!
//! It checks what a real push service checks, independently of the code under
//! test: the VAPID `Authorization` (RFC 8292, verified with `jsonwebtoken`),
//! the Web Push headers (`Content-Encoding: aes128gcm`, `TTL`, `Urgency`,
//! `Topic`), the 4096-byte body limit, and it decrypts the body as the browser
//! would (RFC 8291, with Mozilla's `ece` crate, not `web-push-native`).
//! Every refused request is recorded with its reason, so a test can assert
//! there were none.
//!
//! ```text
//! let push = PushEmulator::start().await;
//! push.set_vapid_public_key(&server_public_key);
//! let browser = push.new_browser();
//! // ... subscribe with browser.subscription_json(&["orders"]) and publish ...
//! let got = push.wait_for_deliveries(1, Duration::from_secs(5)).await;
//! assert_eq!(got[0].json()["data"], 42);
//! assert!(push.rejections().is_empty(), "{:?}", push.rejections());
//! ```

use std::{
    collections::{HashMap, VecDeque},
    net::TcpListener,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use actix_web::{
    App, HttpRequest, HttpResponse, HttpServer,
    dev::ServerHandle,
    http::{Method, StatusCode, header},
    web,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// The largest body accepted; bigger ones get 413 (RFC 8030 section 7.2
/// requires push services to take at least 4096 bytes, and the big ones take
/// no more).
pub const MAX_BODY: usize = 4096;

/// How far ahead a VAPID token's `exp` may be (RFC 8292 section 2).
const MAX_EXP_AHEAD_SECS: f64 = 24.0 * 60.0 * 60.0;

/// Length of the aes128gcm header before the key id: salt, rs, idlen (RFC 8188).
const ECE_HEADER_LEN: usize = 21;

/// Length of an uncompressed P-256 point.
const POINT_LEN: usize = 65;

/// A running push service emulator. Clones share the same server, which
/// stops when the last clone is dropped (or on [`PushEmulator::stop`]).
#[derive(Clone)]
pub struct PushEmulator {
    state: Arc<State>,
    server: Arc<ServerGuard>,
}

/// Stops the server when dropped.
struct ServerGuard(ServerHandle);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        // `stop` sends its command at once; the future only waits for the end.
        drop(self.0.stop(false));
    }
}

struct State {
    origin: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The expected VAPID public key (uncompressed point), once set.
    vapid: Option<Vec<u8>>,
    endpoints: HashMap<String, Endpoint>,
    deliveries: Vec<Delivered>,
    rejections: Vec<String>,
    /// Requests being answered now, and the most at once so far.
    in_flight: usize,
    max_in_flight: usize,
}

/// Counts a request in flight until dropped.
struct InFlight(web::Data<State>);

impl InFlight {
    fn new(state: &web::Data<State>) -> InFlight {
        let mut inner = state.lock();
        inner.in_flight += 1;
        inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

struct Endpoint {
    receiver: Receiver,
    script: VecDeque<Scripted>,
    delay: Duration,
    attempts: Vec<Attempt>,
}

/// What a browser decrypts with: its key pair and auth secret.
#[derive(Clone)]
struct Receiver {
    keys: ece::EcKeyComponents,
    auth: Vec<u8>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock must not hide its own
        // failure behind a poisoning panic elsewhere.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One browser's push subscription on the emulator.
#[derive(Clone)]
pub struct Browser {
    /// The id in the endpoint's path.
    pub id: String,
    /// `{origin}/push/{id}`: where the push service takes messages for it.
    pub endpoint: String,
    /// The browser's public key (uncompressed P-256 point), base64url without padding.
    pub p256dh: String,
    /// The browser's 16-byte auth secret, base64url without padding.
    pub auth: String,
    receiver: Receiver,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint)
            .field("p256dh", &self.p256dh)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// The subscription as a page would register it:
    /// `{"endpoint": ..., "keys": {"p256dh": ..., "auth": ...}, "topics": [...]}`.
    pub fn subscription_json(&self, topics: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "endpoint": self.endpoint,
            "keys": {"p256dh": self.p256dh, "auth": self.auth},
            "topics": topics,
        })
    }
}

/// A scripted answer to the next request to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scripted {
    /// Answer with this status (410 Gone, 429, 500, ...).
    Status(u16),
    /// Answer with this status and a `Retry-After` of that many seconds.
    StatusRetryAfter(u16, u64),
}

impl Scripted {
    fn status(self) -> u16 {
        match self {
            Scripted::Status(status) | Scripted::StatusRetryAfter(status, _) => status,
        }
    }
}

/// A message the emulator accepted (answered 2xx) and decrypted.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The [`Browser::id`] it was sent to.
    pub browser_id: String,
    /// When the request arrived.
    pub at: Instant,
    /// The `TTL` header.
    pub ttl: u64,
    /// The `Urgency` header, if any.
    pub urgency: Option<String>,
    /// The `Topic` header, if any.
    pub topic: Option<String>,
    /// Size of the encrypted body.
    pub body_len: usize,
    /// The decrypted message.
    pub plaintext: Vec<u8>,
}

impl Delivered {
    /// The plaintext as JSON; panics, showing the text, if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.plaintext).unwrap_or_else(|e| {
            panic!(
                "push message to {} is not JSON ({e}): {}",
                self.browser_id,
                String::from_utf8_lossy(&self.plaintext)
            )
        })
    }
}

/// One request to an endpoint, whatever it was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// When the request arrived.
    pub at: Instant,
    /// The status answered (scripted, a refusal, or 201).
    pub status: u16,
    /// Size of the request body.
    pub body_len: usize,
}

impl PushEmulator {
    /// Starts the emulator on a free port of 127.0.0.1.
    pub async fn start() -> PushEmulator {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the push emulator");
        let port = listener.local_addr().expect("push emulator address").port();
        let state = Arc::new(State {
            origin: format!("http://127.0.0.1:{port}"),
            inner: Mutex::default(),
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(handle))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .expect("push emulator listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        PushEmulator {
            state,
            server: Arc::new(ServerGuard(handle)),
        }
    }

    /// `http://127.0.0.1:PORT`: what a VAPID token's `aud` must be.
    pub fn origin(&self) -> String {
        self.state.origin.clone()
    }

    /// The application server's VAPID public key (uncompressed P-256 point,
    /// base64url without padding) that requests must carry as `k` and be
    /// signed with. Until it is set every request is refused with 401.
    /// Panics if the key is not a 65-byte uncompressed point.
    pub fn set_vapid_public_key(&self, key_b64url: &str) {
        let key = URL_SAFE_NO_PAD
            .decode(key_b64url.trim())
            .unwrap_or_else(|e| panic!("VAPID public key {key_b64url:?} is not base64url: {e}"));
        assert!(
            key.len() == POINT_LEN && key[0] == 0x04,
            "VAPID public key {key_b64url:?} is not an uncompressed P-256 point (65 bytes, 0x04 first)"
        );
        self.state.lock().vapid = Some(key);
    }

    /// A new browser subscription: the endpoint `{origin}/push/{uuid}` and
    /// fresh keys.
    pub fn new_browser(&self) -> Browser {
        let (key_pair, auth) =
            ece::generate_keypair_and_auth_secret().expect("generate browser keys");
        let keys = key_pair.raw_components().expect("browser key components");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let browser = Browser {
            endpoint: format!("{}/push/{id}", self.state.origin),
            p256dh: URL_SAFE_NO_PAD.encode(keys.public_key()),
            auth: URL_SAFE_NO_PAD.encode(auth),
            receiver: Receiver {
                keys,
                auth: auth.to_vec(),
            },
            id,
        };
        self.state.lock().endpoints.insert(
            browser.id.clone(),
            Endpoint {
                receiver: browser.receiver.clone(),
                script: VecDeque::new(),
                delay: Duration::ZERO,
                attempts: Vec::new(),
            },
        );
        browser
    }

    /// Queues answers for one endpoint: each valid request to it pops the
    /// next one; once the queue is empty, requests get 201 Created. A
    /// scripted non-2xx answer is recorded as an attempt but the message is
    /// not counted as delivered. Requests that fail verification are refused
    /// without popping. Panics on a status outside 100..=599.
    pub fn script(&self, browser: &Browser, responses: Vec<Scripted>) {
        for r in &responses {
            assert!(
                (100..=599).contains(&r.status()),
                "scripted status {} is not an HTTP status",
                r.status()
            );
        }
        let mut inner = self.state.lock();
        endpoint(&mut inner, browser).script.extend(responses);
    }

    /// Makes the endpoint wait `delay` before answering (a slow push service).
    /// A message counts as delivered only once its answer is due, so one
    /// whose sender gave up during the delay may not be.
    pub fn set_delay(&self, browser: &Browser, delay: Duration) {
        let mut inner = self.state.lock();
        endpoint(&mut inner, browser).delay = delay;
    }

    /// Every message answered 2xx (201 unless scripted otherwise), in
    /// arrival order.
    pub fn deliveries(&self) -> Vec<Delivered> {
        let mut all = self.state.lock().deliveries.clone();
        all.sort_by_key(|d| d.at);
        all
    }

    /// The deliveries to one browser, in arrival order.
    pub fn deliveries_to(&self, browser: &Browser) -> Vec<Delivered> {
        let mut all = self.deliveries();
        all.retain(|d| d.browser_id == browser.id);
        all
    }

    /// Every request to one endpoint, in arrival order, with the status it
    /// was answered: deliveries, scripted failures and refusals alike.
    pub fn attempts_to(&self, browser: &Browser) -> Vec<Attempt> {
        let mut inner = self.state.lock();
        let mut attempts = endpoint(&mut inner, browser).attempts.clone();
        attempts.sort_by_key(|a| a.at);
        attempts
    }

    /// Every request refused (verification failure, unknown endpoint), as
    /// `"<status> <method> <path>: <reason>"`.
    pub fn rejections(&self) -> Vec<String> {
        self.state.lock().rejections.clone()
    }

    /// The most requests (to any endpoint) this emulator answered at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.lock().max_in_flight
    }

    /// Waits until at least `n` messages were delivered and returns all
    /// deliveries; panics after `timeout`, saying how many arrived.
    pub async fn wait_for_deliveries(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.deliveries();
            if got.len() >= n {
                return got;
            }
            if Instant::now() >= deadline {
                panic!(
                    "push emulator: expected {n} deliveries within {timeout:?}, {} arrived; \
                     rejections: {:?}",
                    got.len(),
                    self.rejections()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the server now (requests in flight are dropped).
    pub async fn stop(&self) {
        self.server.0.stop(false).await;
    }
}

fn endpoint<'a>(inner: &'a mut Inner, browser: &Browser) -> &'a mut Endpoint {
    inner
        .endpoints
        .get_mut(&browser.id)
        .unwrap_or_else(|| panic!("browser {} is not from this push emulator", browser.id))
}

/// A request the emulator refuses: the status and why.
#[derive(Debug)]
struct Refusal {
    status: u16,
    reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// A verified, decrypted message.
struct Message {
    ttl: u64,
    urgency: Option<String>,
    topic: Option<String>,
    plaintext: Vec<u8>,
}

async fn handle(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<State>,
) -> HttpResponse {
    let _in_flight = InFlight::new(&state);
    let arrived = Instant::now();
    let what = format!("{} {}", req.method(), req.path());
    let id = req
        .path()
        .strip_prefix("/push/")
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .map(str::to_owned);
    let found = id.and_then(|id| {
        let inner = state.lock();
        let ep = inner.endpoints.get(&id)?;
        Some((id, ep.receiver.clone(), inner.vapid.clone()))
    });
    let Some((id, receiver, vapid)) = found else {
        let reason = "no such push endpoint";
        state
            .lock()
            .rejections
            .push(format!("404 {what}: {reason}"));
        return HttpResponse::NotFound().body(reason);
    };

    // Read the whole body, keeping no more than what could be accepted.
    let mut body = Vec::new();
    let mut body_len = 0;
    let mut read_error = None;
    while let Some(chunk) = payload.next().await {
        match chunk {
            Ok(chunk) => {
                body_len += chunk.len();
                if body.len() <= MAX_BODY {
                    body.extend_from_slice(&chunk);
                }
            }
            Err(e) => {
                read_error = Some(refuse(400, format!("cannot read the body: {e}")));
                break;
            }
        }
    }

    let verified = match read_error {
        Some(refusal) => Err(refusal),
        None => verify(
            &req,
            &state.origin,
            vapid.as_deref(),
            body_len,
            &body,
            &receiver,
        ),
    };

    let (status, retry_after, reason, message, delay) = {
        let mut inner = state.lock();
        let Inner {
            endpoints,
            rejections,
            ..
        } = &mut *inner;
        let ep = endpoints.get_mut(&id).expect("endpoints are never removed");
        let (status, retry_after, reason, message) = match verified {
            Err(Refusal { status, reason }) => {
                rejections.push(format!("{status} {what}: {reason}"));
                (status, None, reason, None)
            }
            Ok(message) => match ep.script.pop_front() {
                None => (201, None, String::new(), Some(message)),
                Some(scripted) => {
                    let status = scripted.status();
                    let retry_after = match scripted {
                        Scripted::StatusRetryAfter(_, secs) => Some(secs),
                        Scripted::Status(_) => None,
                    };
                    let accepted = (200..300).contains(&status);
                    let reason = if accepted {
                        String::new()
                    } else {
                        format!("scripted {status}")
                    };
                    (status, retry_after, reason, accepted.then_some(message))
                }
            },
        };
        ep.attempts.push(Attempt {
            at: arrived,
            status,
            body_len,
        });
        (status, retry_after, reason, message, ep.delay)
    };

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let code = StatusCode::from_u16(status).expect("statuses are checked when scripted");
    let mut res = HttpResponse::build(code);
    if let Some(secs) = retry_after {
        res.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    if let Some(message) = message {
        let message_id = uuid::Uuid::new_v4().simple();
        res.insert_header((
            header::LOCATION,
            format!("{}/message/{message_id}", state.origin),
        ));
        state.lock().deliveries.push(Delivered {
            browser_id: id,
            at: arrived,
            ttl: message.ttl,
            urgency: message.urgency,
            topic: message.topic,
            body_len,
            plaintext: message.plaintext,
        });
    }
    res.body(reason)
}

/// Everything a push service checks, in the order it answers them: VAPID,
/// headers, size, then the browser's decryption.
fn verify(
    req: &HttpRequest,
    origin: &str,
    vapid: Option<&[u8]>,
    body_len: usize,
    body: &[u8],
    receiver: &Receiver,
) -> Result<Message, Refusal> {
    if req.method() != Method::POST {
        return Err(refuse(405, "push messages are POSTed"));
    }
    check_vapid(req, origin, vapid)?;
    let encoding = header_value(req, "content-encoding")?
        .ok_or_else(|| refuse(400, "missing Content-Encoding (must be aes128gcm)"))?;
    if !encoding.eq_ignore_ascii_case("aes128gcm") {
        return Err(refuse(
            400,
            format!("Content-Encoding is {encoding:?}, not aes128gcm"),
        ));
    }
    let ttl = header_value(req, "ttl")?.ok_or_else(|| refuse(400, "missing TTL header"))?;
    // Digits only: `u64::from_str` would also take a leading `+`.
    let ttl = match ttl.parse::<u64>() {
        Ok(ttl_secs) if ttl.bytes().all(|b| b.is_ascii_digit()) => ttl_secs,
        _ => {
            return Err(refuse(
                400,
                format!("TTL {ttl:?} is not a non-negative integer"),
            ));
        }
    };
    let urgency = header_value(req, "urgency")?;
    if let Some(urgency) = urgency
        && !["very-low", "low", "normal", "high"].contains(&urgency)
    {
        return Err(refuse(
            400,
            format!("Urgency {urgency:?} is not very-low, low, normal or high"),
        ));
    }
    let topic = header_value(req, "topic")?;
    if let Some(topic) = topic
        && (topic.is_empty()
            || topic.len() > 32
            || !topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(refuse(
            400,
            format!("Topic {topic:?} is not 1 to 32 characters of base64url"),
        ));
    }
    if body_len > MAX_BODY {
        return Err(refuse(
            413,
            format!("body of {body_len} bytes is over {MAX_BODY}"),
        ));
    }
    let plaintext = decrypt(receiver, body)?;
    Ok(Message {
        ttl,
        urgency: urgency.map(str::to_owned),
        topic: topic.map(str::to_owned),
        plaintext,
    })
}

/// A header's value, trimmed; refused if it is not visible ASCII.
fn header_value<'a>(req: &'a HttpRequest, name: &str) -> Result<Option<&'a str>, Refusal> {
    req.headers()
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::trim)
                .map_err(|_| refuse(400, format!("{name} header is not ASCII")))
        })
        .transpose()
}

/// RFC 8292: `Authorization: vapid t=<JWT>, k=<key>`, `k` the expected key,
/// the JWT an ES256 token signed with it for this origin, valid now and for
/// no more than 24 hours, with a `mailto:` or `https:` contact.
fn check_vapid(req: &HttpRequest, origin: &str, expected: Option<&[u8]>) -> Result<(), Refusal> {
    let Some(expected) = expected else {
        return Err(refuse(
            401,
            "no VAPID public key set on the emulator (set_vapid_public_key)",
        ));
    };
    let value = header_value(req, "authorization")?
        .ok_or_else(|| refuse(401, "missing Authorization header"))?;
    let (scheme, params) = value
        .split_once(' ')
        .ok_or_else(|| refuse(401, "Authorization is not `vapid t=<JWT>, k=<key>`"))?;
    if !scheme.eq_ignore_ascii_case("vapid") {
        return Err(refuse(
            401,
            format!("Authorization scheme is {scheme:?}, not vapid"),
        ));
    }
    let (mut token, mut key) = (None, None);
    for param in params.split(',') {
        let (name, value) = param
            .split_once('=')
            .ok_or_else(|| refuse(401, format!("vapid parameter {param:?} has no value")))?;
        let value = value.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            "t" => token = Some(value),
            "k" => key = Some(value),
            _ => {}
        }
    }
    let token = token.ok_or_else(|| refuse(401, "vapid Authorization has no t="))?;
    let key = key.ok_or_else(|| refuse(401, "vapid Authorization has no k="))?;
    let key = URL_SAFE_NO_PAD
        .decode(key)
        .map_err(|e| refuse(401, format!("vapid k is not unpadded base64url: {e}")))?;
    if key != expected {
        return Err(refuse(403, "vapid k is not the expected VAPID public key"));
    }

    let jwt_header = jsonwebtoken::decode_header(token)
        .map_err(|e| refuse(403, format!("vapid t is not a JWT: {e}")))?;
    if jwt_header.alg != Algorithm::ES256 {
        return Err(refuse(
            403,
            format!("vapid JWT alg is {:?}, not ES256", jwt_header.alg),
        ));
    }
    let decoding = DecodingKey::from_ec_components(
        &URL_SAFE_NO_PAD.encode(&expected[1..33]),
        &URL_SAFE_NO_PAD.encode(&expected[33..65]),
    )
    .map_err(|e| refuse(403, format!("unusable VAPID public key: {e}")))?;
    // jsonwebtoken checks the signature; the claims are checked below, each
    // with its own reason.
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(token, &decoding, &validation)
        .map_err(|e| refuse(403, format!("vapid JWT does not verify with k: {e}")))?
        .claims;

    let aud = claims
        .get("aud")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| refuse(403, "vapid JWT has no aud string"))?;
    if aud != origin {
        return Err(refuse(
            403,
            format!("vapid JWT aud is {aud:?}, not the push service's origin {origin:?}"),
        ));
    }
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| refuse(403, "vapid JWT has no numeric exp"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    if exp <= now {
        return Err(refuse(
            403,
            format!("vapid JWT expired {:.0} s ago", now - exp),
        ));
    }
    if exp > now + MAX_EXP_AHEAD_SECS {
        return Err(refuse(
            403,
            format!("vapid JWT exp is {:.0} s ahead, more than 24 h", exp - now),
        ));
    }
    let sub = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| refuse(403, "vapid JWT has no sub"))?;
    if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
        return Err(refuse(
            403,
            format!("vapid JWT sub {sub:?} is not a mailto: or https: contact"),
        ));
    }
    Ok(())
}

/// RFC 8291: a single aes128gcm record whose key id is the sender's
/// ephemeral public key, decrypted with the browser's keys.
fn decrypt(receiver: &Receiver, body: &[u8]) -> Result<Vec<u8>, Refusal> {
    if body.len() < ECE_HEADER_LEN {
        return Err(refuse(
            400,
            format!(
                "body of {} bytes is shorter than the aes128gcm header",
                body.len()
            ),
        ));
    }
    let rs = u32::from_be_bytes([body[16], body[17], body[18], body[19]]) as usize;
    let idlen = usize::from(body[20]);
    if idlen != POINT_LEN {
        return Err(refuse(
            400,
            format!("aes128gcm keyid is {idlen} bytes, not the sender's 65-byte public key"),
        ));
    }
    let records = body.len().saturating_sub(ECE_HEADER_LEN + idlen);
    if records > rs {
        return Err(refuse(
            400,
            format!("{records} bytes of records with rs {rs}: more than the one record allowed"),
        ));
    }
    ece::decrypt(&receiver.keys, &receiver.auth, body)
        .map_err(|e| refuse(400, format!("cannot decrypt the body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use web_push_native::{
        Auth, WebPushBuilder,
        jwt_simple::prelude::{
            Clock, Duration as JwtDuration, ECDSAP256KeyPairLike, ECDSAP256PublicKeyLike,
            ES256KeyPair,
        },
        p256::PublicKey,
    };

    /// An application server: a VAPID key and web-push-native to encrypt and sign.
    struct Sender {
        key: ES256KeyPair,
        http: reqwest::Client,
    }

    impl Sender {
        fn new() -> Sender {
            Sender {
                key: ES256KeyPair::generate(),
                http: reqwest::Client::new(),
            }
        }

        fn public_key(&self) -> String {
            URL_SAFE_NO_PAD.encode(self.key.public_key().public_key().to_bytes_uncompressed())
        }

        /// `vapid t=..., k=...` with a token signed by `signer` for `aud`.
        fn vapid_with(
            &self,
            signer: &ES256KeyPair,
            aud: &str,
            valid_for: JwtDuration,
            sub: &str,
        ) -> String {
            let claims = web_push_native::jwt_simple::prelude::Claims::create(valid_for)
                .with_audience(aud)
                .with_subject(sub);
            let token = signer.sign(claims).expect("sign VAPID token");
            format!("vapid t={token}, k={}", self.public_key())
        }

        fn vapid(&self, aud: &str) -> String {
            self.vapid_with(
                &self.key,
                aud,
                JwtDuration::from_hours(12),
                "mailto:ops@example.com",
            )
        }

        fn encrypt(browser: &Browser, plaintext: &[u8]) -> Vec<u8> {
            let ua_public = PublicKey::from_sec1_bytes(
                &URL_SAFE_NO_PAD.decode(&browser.p256dh).expect("p256dh"),
            )
            .expect("p256dh is a point");
            let auth =
                Auth::clone_from_slice(&URL_SAFE_NO_PAD.decode(&browser.auth).expect("auth"));
            web_push_native::encrypt(plaintext.to_vec(), &ua_public, &auth).expect("encrypt")
        }

        async fn post(
            &self,
            url: &str,
            headers: &[(&str, &str)],
            body: Vec<u8>,
        ) -> reqwest::Response {
            let mut req = self.http.post(url).body(body);
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            req.send().await.expect("request to the push emulator")
        }

        /// A valid push of `plaintext` with `extra` headers; the status.
        async fn push(&self, emu: &PushEmulator, browser: &Browser, plaintext: &[u8]) -> u16 {
            let vapid = self.vapid(&emu.origin());
            let headers = [
                ("Authorization", vapid.as_str()),
                ("Content-Encoding", "aes128gcm"),
                ("TTL", "60"),
            ];
            let body = Self::encrypt(browser, plaintext);
            self.post(&browser.endpoint, &headers, body)
                .await
                .status()
                .as_u16()
        }
    }

    #[tokio::test]
    async fn round_trip_decrypts_what_web_push_native_sent() {
        let emu = PushEmulator::start().await;
        let sender = Sender::new();
        emu.set_vapid_public_key(&sender.public_key());
        let browser = emu.new_browser();
        let other = emu.new_browser();
        assert!(
            browser
                .endpoint
                .starts_with(&format!("{}/push/", emu.origin()))
        );
        let sub = browser.subscription_json(&["orders"]);
        assert_eq!(sub["endpoint"], browser.endpoint.as_str());
        assert_eq!(sub["keys"]["p256dh"], browser.p256dh.as_str());
        assert_eq!(sub["keys"]["auth"], browser.auth.as_str());
        assert_eq!(sub["topics"], serde_json::json!(["orders"]));

        let vapid = sender.vapid(&emu.origin());
        let res = sender
            .post(
                &browser.endpoint,
                &[
                    ("Authorization", vapid.as_str()),
                    ("Content-Encoding", "aes128gcm"),
                    ("TTL", "3600"),
                    ("Urgency", "high"),
                    ("Topic", "order-42"),
                ],
                Sender::encrypt(&browser, br#"{"topic":"orders","seq":7}"#),
            )
            .await;
        assert_eq!(res.status(), 201, "{:?}", emu.rejections());
        let location = res.headers()["location"].to_str().expect("location");
        assert!(location.starts_with(&format!("{}/message/", emu.origin())));

        let got = emu.wait_for_deliveries(1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1);
        let d = &got[0];
        assert_eq!(d.browser_id, browser.id);
        assert_eq!(d.json(), serde_json::json!({"topic": "orders", "seq": 7}));
        assert_eq!(d.ttl, 3600);
        assert_eq!(d.urgency.as_deref(), Some("high"));
        assert_eq!(d.topic.as_deref(), Some("order-42"));
        assert!(d.body_len > d.plaintext.len() + 86);
        assert_eq!(emu.deliveries_to(&browser).len(), 1);
        assert!(emu.deliveries_to(&other).is_empty());
        let attempts = emu.attempts_to(&browser);
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].status, 201);
        assert_eq!(attempts[0].body_len, d.body_len);
        assert!(emu.rejections().is_empty(), "{:?}", emu.rejections());

        // A second message, without the optional headers, arrives after it.
        assert_eq!(sender.push(&emu, &browser, b"plain text").await, 201);
        let got = emu.wait_for_deliveries(2, Duration::from_secs(5)).await;
        assert_eq!(got[1].plaintext, b"plain text");
        assert_eq!((got[1].urgency.clone(), got[1].topic.clone()), (None, None));
        assert!(got[0].at <= got[1].at);
    }

    #[tokio::test]
    async fn wrong_vapid_is_refused() {
        let emu = PushEmulator::start().await;
        let sender = Sender::new();
        let browser = emu.new_browser();
        let body = || Sender::encrypt(&browser, b"hello");
        let origin = emu.origin();
        let send = |auth: String| {
            let (sender, endpoint, body) = (&sender, browser.endpoint.clone(), body());
            async move {
                let headers = [
                    ("Authorization", auth.as_str()),
                    ("Content-Encoding", "aes128gcm"),
                    ("TTL", "60"),
                ];
                let res = sender.post(&endpoint, &headers, body).await;
                let status = res.status().as_u16();
                (status, res.text().await.expect("reason"))
            }
        };

        // No key set yet.
        assert_eq!(send(sender.vapid(&origin)).await.0, 401);

        // The emulator expects another server's key.
        let stranger = Sender::new();
        emu.set_vapid_public_key(&stranger.public_key());
        let (status, reason) = send(sender.vapid(&origin)).await;
        assert_eq!(status, 403);
        assert!(reason.contains("expected VAPID public key"), "{reason}");

        emu.set_vapid_public_key(&sender.public_key());
        let cases: Vec<(String, u16, &str)> = vec![
            (
                sender.vapid(&format!("{origin}/")),
                403,
                "not the push service's origin",
            ),
            (sender.vapid("http://127.0.0.1"), 403, "aud"),
            (
                // k says the right key, the token is signed by another.
                sender.vapid_with(
                    &stranger.key,
                    &origin,
                    JwtDuration::from_hours(1),
                    "mailto:a@b.c",
                ),
                403,
                "does not verify",
            ),
            (
                sender.vapid_with(
                    &sender.key,
                    &origin,
                    JwtDuration::from_hours(25),
                    "mailto:a@b.c",
                ),
                403,
                "more than 24 h",
            ),
            (
                sender.vapid_with(&sender.key, &origin, JwtDuration::from_hours(1), "ops"),
                403,
                "mailto:",
            ),
            ("Bearer abc".to_owned(), 401, "not vapid"),
            ("vapid k=abc".to_owned(), 401, "no t="),
        ];
        for (auth, want, why) in cases {
            let (status, reason) = send(auth.clone()).await;
            assert_eq!(status, want, "{auth}: {reason}");
            assert!(reason.contains(why), "{auth}: {reason}");
        }

        // An expired token.
        let mut claims =
            web_push_native::jwt_simple::prelude::Claims::create(JwtDuration::from_hours(1))
                .with_audience(&origin)
                .with_subject("https://example.com/contact");
        claims.expires_at = Some(Clock::now_since_epoch() - JwtDuration::from_secs(60));
        let token = sender.key.sign(claims).expect("sign");
        let (status, reason) = send(format!("vapid t={token}, k={}", sender.public_key())).await;
        assert_eq!(
            (status, reason.contains("expired")),
            (403, true),
            "{reason}"
        );

        assert!(emu.deliveries().is_empty());
        assert_eq!(emu.rejections().len(), 10, "{:#?}", emu.rejections());
        assert!(emu.attempts_to(&browser).iter().all(|a| a.status >= 400));
    }

    /// web-push-native's own VAPID header puts `scheme://host` in `aud`,
    /// dropping the port: correct for real push services on 443, refused by
    /// an emulator on a free port. Whoever sends must sign `aud` itself.
    #[tokio::test]
    async fn web_push_native_vapid_drops_the_port() {
        let emu = PushEmulator::start().await;
        let sender = Sender::new();
        emu.set_vapid_public_key(&sender.public_key());
        let browser = emu.new_browser();
        let ua_public =
            PublicKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(&browser.p256dh).expect("p256dh"))
                .expect("point");
        let auth = Auth::clone_from_slice(&URL_SAFE_NO_PAD.decode(&browser.auth).expect("auth"));
        let request = WebPushBuilder::new(
            browser.endpoint.parse().expect("endpoint URI"),
            ua_public,
            auth,
        )
        .with_vapid(&sender.key, "mailto:ops@example.com")
        .build(b"hi".to_vec())
        .expect("build");
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .filter(|(name, _)| *name != "content-length")
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ASCII").to_owned()))
            .collect();
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let res = sender
            .post(&browser.endpoint, &headers, request.into_body())
            .await;
        assert_eq!(res.status(), 403);
        let reason = res.text().await.expect("reason");
        assert!(reason.contains(r#"aud is "http://127.0.0.1""#), "{reason}");
    }

    #[tokio::test]
    async fn bad_headers_and_bodies_are_refused() {
        let emu = PushEmulator::start().await;
        let sender = Sender::new();
        emu.set_vapid_public_key(&sender.public_key());
        let browser = emu.new_browser();
        let other = emu.new_browser();
        let vapid = sender.vapid(&emu.origin());
        let good = Sender::encrypt(&browser, b"hello");
        let with = |extra: &[(&'static str, &'static str)], skip: &str| {
            let mut h = vec![
                ("Authorization", vapid.as_str()),
                ("Content-Encoding", "aes128gcm"),
                ("TTL", "60"),
            ];
            h.retain(|(n, _)| *n != skip);
            h.retain(|(n, _)| !extra.iter().any(|(e, _)| e == n));
            h.extend_from_slice(extra);
            h
        };
        // Headers, body, the status expected and a word of the reason.
        type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (with(&[], "TTL"), good.clone(), 400, "missing TTL"),
            (with(&[("TTL", "-1")], ""), good.clone(), 400, "TTL"),
            (
                with(&[], "Content-Encoding"),
                good.clone(),
                400,
                "Content-Encoding",
            ),
            (
                with(&[("Content-Encoding", "aesgcm")], ""),
                good.clone(),
                400,
                "not aes128gcm",
            ),
            (
                with(&[("Urgency", "urgent")], ""),
                good.clone(),
                400,
                "Urgency",
            ),
            (
                with(&[("Topic", "a-topic-that-is-much-longer-than-32")], ""),
                good.clone(),
                400,
                "Topic",
            ),
            (with(&[("Topic", "a.b")], ""), good.clone(), 400, "Topic"),
            (with(&[], ""), vec![7; MAX_BODY + 1], 413, "over 4096"),
            (with(&[], ""), vec![7; 100], 400, "keyid"),
            (with(&[], ""), Vec::new(), 400, "shorter"),
            (
                with(&[], ""),
                Sender::encrypt(&other, b"not yours"),
                400,
                "cannot decrypt",
            ),
        ];
        let n = cases.len();
        for (headers, body, want, why) in cases {
            let res = sender.post(&browser.endpoint, &headers, body).await;
            let status = res.status().as_u16();
            let reason = res.text().await.expect("reason");
            assert_eq!(status, want, "{headers:?}: {reason}");
            assert!(reason.contains(why), "{headers:?}: {reason}");
        }

        // Unknown endpoints and methods.
        let res = sender
            .post(
                &format!("{}/push/nope", emu.origin()),
                &with(&[], ""),
                good.clone(),
            )
            .await;
        assert_eq!(res.status(), 404);
        let res = sender
            .http
            .get(&browser.endpoint)
            .send()
            .await
            .expect("GET");
        assert_eq!(res.status(), 405);

        assert!(emu.deliveries().is_empty());
        assert_eq!(emu.rejections().len(), n + 2, "{:#?}", emu.rejections());
        assert_eq!(emu.attempts_to(&browser).len(), n + 1);

        // A body of exactly 4096 bytes is fine.
        let big = Sender::encrypt(&browser, &[b'x'; MAX_BODY - 86 - 17]);
        assert_eq!(big.len(), MAX_BODY);
        let res = sender.post(&browser.endpoint, &with(&[], ""), big).await;
        assert_eq!(res.status(), 201);
    }

    #[tokio::test]
    async fn scripted_failures_are_answered_and_not_delivered() {
        let emu = PushEmulator::start().await;
        let sender = Sender::new();
        emu.set_vapid_public_key(&sender.public_key());
        let browser = emu.new_browser();
        emu.script(
            &browser,
            vec![Scripted::Status(410), Scripted::StatusRetryAfter(429, 7)],
        );

        assert_eq!(sender.push(&emu, &browser, b"one").await, 410);
        let vapid = sender.vapid(&emu.origin());
        let headers = [
            ("Authorization", vapid.as_str()),
            ("Content-Encoding", "aes128gcm"),
            ("TTL", "60"),
        ];
        let res = sender
            .post(
                &browser.endpoint,
                &headers,
                Sender::encrypt(&browser, b"two"),
            )
            .await;
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "7");
        assert_eq!(sender.push(&emu, &browser, b"three").await, 201);

        let statuses: Vec<u16> = emu.attempts_to(&browser).iter().map(|a| a.status).collect();
        assert_eq!(statuses, [410, 429, 201]);
        let got = emu.deliveries();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].plaintext, b"three");
        assert!(emu.rejections().is_empty(), "{:?}", emu.rejections());
    }

    #[tokio::test]
    async fn delay_slows_the_answer() {
        let emu = PushEmulator::start().await;
        let sender = Sender::new();
        emu.set_vapid_public_key(&sender.public_key());
        let browser = emu.new_browser();
        emu.set_delay(&browser, Duration::from_millis(300));
        let start = Instant::now();
        assert_eq!(sender.push(&emu, &browser, b"slow").await, 201);
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(emu.deliveries_to(&browser).len(), 1);
    }

    #[tokio::test]
    #[should_panic(expected = "expected 1 deliveries within 50ms, 0 arrived")]
    async fn waiting_in_vain_says_how_many_arrived() {
        let emu = PushEmulator::start().await;
        emu.wait_for_deliveries(1, Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn stop_closes_the_port() {
        let emu = PushEmulator::start().await;
        let addr = emu.origin().trim_start_matches("http://").to_owned();
        emu.stop().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
