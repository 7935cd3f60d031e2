//! JWT bearer tokens: who may subscribe to and publish on which topics.
//!
//! A token is taken from `Authorization: Bearer`, else the `rt_token` cookie,
//! else the `access_token` query parameter (for browsers' EventSource and
//! WebSocket, which cannot set headers). Claims:
//!
//! ```json
//! {"sub": "user-1", "exp": 1900000000, "subscribe": ["chat.*"], "publish": ["chat.>"]}
//! ```
//!
//! Patterns follow NATS subject rules over the topic's `.`-separated tokens:
//! `*` matches one token, a final `>` matches one or more.

use std::{future::Ready, path::Path};

use actix_web::{
    FromRequest, HttpRequest,
    cookie::Cookie,
    dev::{Payload, RequestHead},
    web,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::{config::Settings, context::Context, error::ApiError, event::Topic};

/// Name of the cookie a token may be carried in.
pub const TOKEN_COOKIE: &str = "rt_token";
/// Name of the query parameter a token may be carried in.
pub const TOKEN_QUERY: &str = "access_token";

/// How requests are authenticated.
pub enum Auth {
    /// No key configured: every request may do everything.
    Anonymous,
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Auth::Anonymous"),
            Auth::Jwt { validation, .. } => write!(f, "Auth::Jwt({:?})", validation.algorithms),
        }
    }
}

/// The claims read from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Seconds since the Unix epoch (required and checked by the validation).
    exp: Option<u64>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Who is asking, and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: Option<String>,
    /// When the token stops being valid (its `exp` plus the allowed clock
    /// skew); long-lived connections end then. None: anonymous.
    pub expires_at: Option<std::time::SystemTime>,
    anonymous: bool,
    subscribe: Vec<String>,
    publish: Vec<String>,
}

impl Auth {
    /// Builds the authenticator the settings ask for.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Auth> {
        match (&settings.jwt_secret, &settings.jwt_public_key) {
            (Some(_), Some(_)) => {
                anyhow::bail!("give either --jwt-secret or --jwt-public-key, not both")
            }
            (Some(secret), None) => {
                if secret.len() < 16 {
                    anyhow::bail!("--jwt-secret is too short: use at least 16 bytes");
                }
                Ok(Auth::jwt(
                    DecodingKey::from_secret(secret.as_bytes()),
                    Algorithm::HS256,
                ))
            }
            (None, Some(path)) => Self::from_public_key_file(path),
            (None, None) => Ok(Auth::Anonymous),
        }
    }

    fn from_public_key_file(path: &Path) -> anyhow::Result<Auth> {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read JWT public key {}: {e}", path.display()))?;
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Auth::jwt(key, Algorithm::ES256));
        }
        match DecodingKey::from_rsa_pem(&pem) {
            Ok(key) => Ok(Auth::jwt(key, Algorithm::RS256)),
            Err(e) => anyhow::bail!(
                "{} is neither a P-256 (ES256) nor an RSA (RS256) public key in PEM: {e}",
                path.display()
            ),
        }
    }

    fn jwt(key: DecodingKey, alg: Algorithm) -> Auth {
        let mut validation = Validation::new(alg);
        validation.leeway = 5;
        validation.validate_aud = false;
        Auth::Jwt {
            key: Box::new(key),
            validation: Box::new(validation),
        }
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Auth::Anonymous)
    }

    /// Finds and checks the request's token.
    pub fn authenticate(&self, req: &RequestHead) -> Result<Principal, ApiError> {
        let (key, validation) = match self {
            Auth::Anonymous => return Ok(Principal::anonymous()),
            Auth::Jwt { key, validation } => (key, validation),
        };
        let token = find_token(req).ok_or_else(|| {
            ApiError::unauthorized(
                "missing_token",
                format!(
                    "a token is required: send `Authorization: Bearer <jwt>`, the `{TOKEN_COOKIE}` cookie or the `{TOKEN_QUERY}` query parameter"
                ),
            )
        })?;
        let data = jsonwebtoken::decode::<Claims>(&token, key, validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => {
                ApiError::unauthorized("token_expired", "the token has expired")
            }
            ErrorKind::InvalidSignature => {
                ApiError::unauthorized("invalid_token", "the token's signature does not verify")
            }
            ErrorKind::MissingRequiredClaim(claim) => ApiError::unauthorized(
                "invalid_token",
                format!("the token lacks the required `{claim}` claim"),
            ),
            ErrorKind::InvalidAlgorithm => ApiError::unauthorized(
                "invalid_token",
                format!("the token must be signed with {:?}", validation.algorithms),
            ),
            _ => ApiError::unauthorized("invalid_token", format!("the token is not valid: {e}")),
        })?;
        let expires_at = data.claims.exp.map(|exp| {
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(exp.saturating_add(validation.leeway))
        });
        Ok(Principal {
            subject: data.claims.sub,
            expires_at,
            anonymous: false,
            subscribe: data.claims.subscribe,
            publish: data.claims.publish,
        })
    }
}

fn find_token(req: &RequestHead) -> Option<String> {
    if let Some(value) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = value.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    // As actix-web reads cookies: `;`-separated, percent-decoded, the
    // unparsable skipped.
    let cookie = req
        .headers()
        .get_all("cookie")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';').map(str::trim))
        .filter_map(|c| Cookie::parse_encoded(c).ok())
        .find(|c| c.name() == TOKEN_COOKIE);
    if let Some(cookie) = cookie {
        return Some(cookie.value().to_owned());
    }
    web::Query::<Vec<(String, String)>>::from_query(req.uri.query().unwrap_or_default())
        .ok()?
        .0
        .into_iter()
        .find(|(k, _)| k == TOKEN_QUERY)
        .map(|(_, v)| v)
}

impl Principal {
    pub fn anonymous() -> Principal {
        Principal {
            subject: None,
            expires_at: None,
            anonymous: true,
            subscribe: Vec::new(),
            publish: Vec::new(),
        }
    }

    /// Completes when the token expires; never for anonymous access.
    /// Long-lived connections race it to end when their token does.
    pub async fn expiry(&self) {
        match self.expires_at {
            Some(at) => {
                let left = at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    }

    pub fn can_publish(&self, topic: &Topic) -> bool {
        self.anonymous
            || self
                .publish
                .iter()
                .any(|p| pattern_matches(p, topic.as_str()))
    }

    pub fn can_subscribe(&self, topic: &Topic) -> bool {
        self.anonymous
            || self
                .subscribe
                .iter()
                .any(|p| pattern_matches(p, topic.as_str()))
    }

    pub fn require_publish(&self, topic: &Topic) -> Result<(), ApiError> {
        if self.can_publish(topic) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "the token does not allow publishing to topic {topic:?}",
                topic = topic.as_str()
            )))
        }
    }

    pub fn require_subscribe(&self, topic: &Topic) -> Result<(), ApiError> {
        if self.can_subscribe(topic) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "the token does not allow subscribing to topic {topic:?}",
                topic = topic.as_str()
            )))
        }
    }

    /// [`Principal::require_subscribe`] for each of `topics`.
    pub fn require_subscribe_all(&self, topics: &[Topic]) -> Result<(), ApiError> {
        topics.iter().try_for_each(|t| self.require_subscribe(t))
    }
}

/// NATS-style match of `pattern` against a topic's `.`-separated tokens.
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    let mut pat = pattern.split('.');
    let mut top = topic.split('.');
    loop {
        match (pat.next(), top.next()) {
            (Some(">"), Some(_)) => return pat.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(p), Some(t)) if p == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Ready<Result<Principal, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = match req.app_data::<web::Data<Context>>() {
            Some(ctx) => ctx.auth.authenticate(req.head()),
            None => Err(ApiError::internal(anyhow::anyhow!(
                "no Context in app data"
            ))),
        };
        std::future::ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::pattern_matches;

    #[test]
    fn patterns_follow_nats_token_rules() {
        let cases = [
            ("chat", "chat", true),
            ("chat", "chat.a", false),
            ("chat.*", "chat.a", true),
            ("chat.*", "chat.a.b", false),
            ("chat.*", "chat", false),
            ("chat.>", "chat.a.b", true),
            ("chat.>", "chat", false),
            (">", "anything.at.all", true),
            ("*", "one", true),
            ("*", "one.two", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.>.c", "a.b.c", false),
        ];
        for (pattern, topic, want) in cases {
            assert_eq!(
                pattern_matches(pattern, topic),
                want,
                "{pattern} vs {topic}"
            );
        }
    }
}
