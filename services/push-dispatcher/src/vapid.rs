//! Every use of P-256 and base64url in the service: the VAPID key pair
//! (RFC 8292) and the check of a browser's subscription keys (RFC 8291).
//!
//! Keys travel as base64url without padding, the form browsers and Web Push
//! libraries use: the private key is the raw 32-byte scalar (what
//! `web_push::VapidSignatureBuilder::from_base64` and web-push-native take),
//! the public key the 65-byte uncompressed SEC1 point (`0x04 || X || Y`) that a
//! page passes to `pushManager.subscribe({applicationServerKey})`. Keeping
//! this in one module means the library that signs and encrypts can change
//! without touching the routes or the store.

use base64::{
    Engine,
    alphabet::URL_SAFE,
    engine::{
        DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::URL_SAFE_NO_PAD,
    },
};
use std::time::Duration;

use p256::{
    FieldBytes, PublicKey, SecretKey, elliptic_curve::sec1::ToEncodedPoint, pkcs8::DecodePrivateKey,
};
use web_push_native::jwt_simple::{
    algorithms::{ECDSAP256KeyPairLike, ES256KeyPair},
    claims::Claims,
};

/// base64url that accepts input with or without `=` padding.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Length of a browser's auth secret (RFC 8291, section 3.2).
const AUTH_SECRET_LEN: usize = 16;
/// Length of an uncompressed P-256 point.
const UNCOMPRESSED_POINT_LEN: usize = 65;

/// A key that cannot be used, and why (the message is meant for whoever
/// supplied it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyError(String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

fn key_error(message: impl Into<String>) -> KeyError {
    KeyError(message.into())
}

/// Decodes base64url, padded or not.
fn decode(what: &str, value: &str) -> Result<Vec<u8>, KeyError> {
    LENIENT
        .decode(value.trim())
        .map_err(|e| key_error(format!("{what} is not base64url: {e}")))
}

fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The server's VAPID key pair.
pub(crate) struct VapidKeys {
    private: String,
    public: String,
    signer: ES256KeyPair,
}

impl std::fmt::Debug for VapidKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VapidKeys")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl VapidKeys {
    /// A fresh key pair from the operating system's random source.
    pub(crate) fn generate() -> VapidKeys {
        Self::from_secret(&SecretKey::random(&mut rand_core::OsRng))
    }

    /// The pair of a private key given as the raw 32-byte scalar in
    /// base64url, or as PEM (`EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`, what
    /// `openssl ecparam -name prime256v1 -genkey` and `openssl genpkey` write).
    pub(crate) fn from_private(private: &str) -> Result<VapidKeys, KeyError> {
        let private = private.trim();
        if private.starts_with("-----BEGIN") {
            let secret = SecretKey::from_sec1_pem(private)
                .or_else(|_| SecretKey::from_pkcs8_pem(private))
                .map_err(|_| {
                    key_error(
                        "the VAPID private key is PEM but not a P-256 key \
                         (expected EC PRIVATE KEY or PRIVATE KEY on prime256v1)",
                    )
                })?;
            return Ok(Self::from_secret(&secret));
        }
        let bytes = decode("the VAPID private key", private)?;
        if bytes.len() != 32 {
            return Err(key_error(format!(
                "the VAPID private key must be the raw 32-byte P-256 scalar, not {} bytes",
                bytes.len()
            )));
        }
        let secret = SecretKey::from_bytes(FieldBytes::from_slice(&bytes)).map_err(|_| {
            key_error("the VAPID private key is not a valid P-256 scalar (zero or too large)")
        })?;
        Ok(Self::from_secret(&secret))
    }

    fn from_secret(secret: &SecretKey) -> VapidKeys {
        let point = secret.public_key().to_encoded_point(false);
        let raw = secret.to_bytes();
        VapidKeys {
            private: encode(&raw),
            public: encode(point.as_bytes()),
            // expect: any valid P-256 scalar is a valid ES256 key
            signer: ES256KeyPair::from_bytes(&raw).expect("a P-256 scalar is an ES256 key"),
        }
    }

    /// The `Authorization` header value for requests to `origin`
    /// (`scheme://host[:port]`, the JWT's `aud`), valid for `valid_for`:
    /// `vapid t=<ES256 JWT>, k=<public key>` (RFC 8292, section 3).
    pub(crate) fn authorization(
        &self,
        origin: &str,
        subject: &str,
        valid_for: Duration,
    ) -> Result<String, KeyError> {
        let claims = Claims::create(valid_for.into())
            .with_audience(origin)
            .with_subject(subject);
        let token = self
            .signer
            .sign(claims)
            .map_err(|e| key_error(format!("cannot sign the VAPID token: {e}")))?;
        Ok(format!("vapid t={token}, k={}", self.public))
    }

    /// The private key, base64url without padding: what the store keeps and
    /// what the sender (the next step) signs VAPID tokens with.
    pub(crate) fn private_base64(&self) -> &str {
        &self.private
    }

    /// The public key: the uncompressed point, base64url without padding.
    pub(crate) fn public_base64(&self) -> &str {
        &self.public
    }
}

/// A browser's keys, decoded for encryption.
pub(crate) struct ClientKeys {
    public: PublicKey,
    auth: web_push_native::Auth,
}

impl ClientKeys {
    /// Decodes keys as stored (checked at registration).
    pub(crate) fn decode(p256dh: &str, auth: &str) -> Result<ClientKeys, KeyError> {
        let point = decode("keys.p256dh", p256dh)?;
        let public = PublicKey::from_sec1_bytes(&point)
            .map_err(|_| key_error("keys.p256dh is not a point on the P-256 curve"))?;
        let secret = decode("keys.auth", auth)?;
        if secret.len() != AUTH_SECRET_LEN {
            return Err(key_error("keys.auth is not 16 bytes"));
        }
        Ok(ClientKeys {
            public,
            auth: web_push_native::Auth::clone_from_slice(&secret),
        })
    }

    /// `message` encrypted for this browser: an `aes128gcm` body of one
    /// record (RFC 8188, RFC 8291), 103 bytes longer than the message.
    pub(crate) fn encrypt(&self, message: Vec<u8>) -> Result<Vec<u8>, KeyError> {
        web_push_native::encrypt(message, &self.public, &self.auth)
            .map_err(|e| key_error(format!("cannot encrypt the push message: {e}")))
    }
}

/// Checks a browser's subscription keys and returns them in canonical form
/// (base64url without padding): `p256dh` must be an uncompressed point on
/// P-256, `auth` 16 bytes.
pub(crate) fn client_keys(p256dh: &str, auth: &str) -> Result<(String, String), KeyError> {
    let point = decode("keys.p256dh", p256dh)?;
    if point.len() != UNCOMPRESSED_POINT_LEN || point[0] != 0x04 {
        return Err(key_error(format!(
            "keys.p256dh must be an uncompressed P-256 public key (65 bytes starting with 0x04), not {} bytes",
            point.len()
        )));
    }
    PublicKey::from_sec1_bytes(&point)
        .map_err(|_| key_error("keys.p256dh is not a point on the P-256 curve"))?;
    let secret = decode("keys.auth", auth)?;
    if secret.len() != AUTH_SECRET_LEN {
        return Err(key_error(format!(
            "keys.auth must be the {AUTH_SECRET_LEN}-byte auth secret, not {} bytes",
            secret.len()
        )));
    }
    Ok((encode(&point), encode(&secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `openssl ecparam -name prime256v1 -genkey`: the raw scalar
    // and the uncompressed public point, both base64url.
    const PRIVATE: &str = "s10k1Lcfq5B_klwCz-_Jdy7JQfUM2XXBJV4I627oYlg";
    const PUBLIC: &str =
        "BLjhA0ocLA-PrZjGKV7kqslj3hlGLndroNnPf_diQTK5YqPunqIXOzlH-jrR-EtAOsUFrH80gDhbcKkieUADZXI";

    // The user agent's keys of the example in RFC 8291, section 5.
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const UA_AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn a_private_key_gives_its_public_key() {
        let keys = VapidKeys::from_private(PRIVATE).unwrap();
        assert_eq!(keys.public_base64(), PUBLIC);
        assert_eq!(keys.private_base64(), PRIVATE);
        // Padding is accepted and dropped.
        let padded = VapidKeys::from_private(&format!("{PRIVATE}=")).unwrap();
        assert_eq!(padded.private_base64(), PRIVATE);
    }

    #[test]
    fn generated_keys_round_trip_and_differ() {
        let a = VapidKeys::generate();
        let b = VapidKeys::generate();
        assert_ne!(a.private_base64(), b.private_base64());
        let again = VapidKeys::from_private(a.private_base64()).unwrap();
        assert_eq!(again.public_base64(), a.public_base64());
        let public = URL_SAFE_NO_PAD.decode(a.public_base64()).unwrap();
        assert_eq!((public.len(), public[0]), (65, 0x04));
        assert!(!format!("{a:?}").contains(a.private_base64()));
    }

    #[test]
    fn pem_private_keys_give_the_same_pair() {
        // The PRIVATE key above, as `openssl ec -outform PEM` and
        // `openssl pkcs8 -topk8 -nocrypt` print it.
        let secret = SecretKey::from_bytes(FieldBytes::from_slice(
            &URL_SAFE_NO_PAD.decode(PRIVATE).unwrap(),
        ))
        .unwrap();
        let sec1 = secret.to_sec1_pem(Default::default()).unwrap();
        let pkcs8 =
            p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&secret, Default::default()).unwrap();
        for pem in [sec1.as_str(), pkcs8.as_str()] {
            let keys = VapidKeys::from_private(pem).unwrap();
            assert_eq!(
                (keys.private_base64(), keys.public_base64()),
                (PRIVATE, PUBLIC)
            );
        }
        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(VapidKeys::from_private(garbage).is_err());
    }

    #[test]
    fn authorization_carries_a_token_and_the_public_key() {
        let keys = VapidKeys::from_private(PRIVATE).unwrap();
        let header = keys
            .authorization(
                "https://push.example:8443",
                "mailto:ops@example.com",
                Duration::from_secs(3600),
            )
            .unwrap();
        let (token, key) = header
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .unwrap();
        assert_eq!(key, PUBLIC);
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], "https://push.example:8443");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        assert!(claims["exp"].as_u64().is_some());
    }

    #[test]
    fn bad_private_keys_are_refused() {
        for bad in [
            "",
            "not base64!",
            &encode(&[1; 31]),
            &encode(&[1; 33]),
            &encode(&[0; 32]),
            &encode(&[0xff; 32]),
        ] {
            assert!(VapidKeys::from_private(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn browser_keys_are_checked_and_canonical() {
        let (p256dh, auth) = client_keys(UA_PUBLIC, UA_AUTH).unwrap();
        assert_eq!((p256dh.as_str(), auth.as_str()), (UA_PUBLIC, UA_AUTH));
        let (_, auth) = client_keys(UA_PUBLIC, &format!("{UA_AUTH}==")).unwrap();
        assert_eq!(auth, UA_AUTH);

        let mut off_curve = URL_SAFE_NO_PAD.decode(UA_PUBLIC).unwrap();
        off_curve[64] ^= 1;
        let compressed = {
            let mut c = URL_SAFE_NO_PAD.decode(UA_PUBLIC).unwrap()[..33].to_vec();
            c[0] = 0x02;
            c
        };
        for (p256dh, auth) in [
            (encode(&off_curve), UA_AUTH.to_owned()),
            (encode(&compressed), UA_AUTH.to_owned()),
            ("%%%".to_owned(), UA_AUTH.to_owned()),
            (UA_PUBLIC.to_owned(), encode(&[7; 15])),
            (UA_PUBLIC.to_owned(), encode(&[7; 17])),
            (UA_PUBLIC.to_owned(), "***".to_owned()),
        ] {
            assert!(client_keys(&p256dh, &auth).is_err(), "{p256dh} {auth}");
        }
    }
}
