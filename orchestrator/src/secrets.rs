//! Encryption of provider API keys at rest: AES-256-GCM, one random nonce per value, the row's
//! id as associated data so a ciphertext copied onto another row does not decrypt.
//!
//! The key comes from `secrets.key` (or `AGENTPLANE_SECRET_KEY`), else from `secrets.key_file`
//! (default `<data_dir>/secret.key`), which is created with a random key on first start. Stored
//! values read `v1:<base64 of nonce ‖ ciphertext ‖ tag>`.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use agentplane_config::Settings;
use anyhow::Context;
use data_encoding::BASE64;

/// Also accepted for `secrets.key`.
pub const SECRET_KEY_ENV: &str = "AGENTPLANE_SECRET_KEY";

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

/// Seals and opens secrets bound to a database row.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("not an encrypted value (expected the `v1:` form)")]
    NotSealed,
    #[error("cannot be decrypted with this key (a different secrets.key, or the value was moved to another row)")]
    WrongKey,
}

impl SecretBox {
    /// A box with `key` (32 bytes).
    pub fn new(key: &[u8; 32]) -> Self {
        SecretBox { cipher: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key)) }
    }

    /// The configured key, the environment's, or the key file (created when missing).
    pub fn load(settings: &Settings) -> anyhow::Result<Self> {
        let configured = Some(settings.secrets.key.trim().to_string())
            .filter(|k| !k.is_empty())
            .or_else(|| std::env::var(SECRET_KEY_ENV).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()));
        if let Some(encoded) = configured {
            let key = decode_key(&encoded).context("secrets.key (or AGENTPLANE_SECRET_KEY)")?;
            return Ok(Self::new(&key));
        }
        let path = settings.secret_key_file();
        let key = read_or_create_key_file(&path)?;
        Ok(Self::new(&key))
    }

    /// Encrypts `plaintext` for the row `row_id`.
    pub fn seal(&self, row_id: &str, plaintext: &str) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let sealed = self
            .cipher
            .encrypt(&Nonce::from(nonce_bytes), Payload { msg: plaintext.as_bytes(), aad: row_id.as_bytes() })
            // Encryption fails only for inputs beyond 64 GiB.
            .expect("AES-GCM encryption of an API key");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", BASE64.encode(&out))
    }

    /// Decrypts a value sealed for `row_id`.
    pub fn open(&self, row_id: &str, sealed: &str) -> Result<String, SecretError> {
        let encoded = sealed.strip_prefix(PREFIX).ok_or(SecretError::NotSealed)?;
        let bytes = BASE64.decode(encoded.as_bytes()).map_err(|_| SecretError::NotSealed)?;
        if bytes.len() < NONCE_LEN + 16 {
            return Err(SecretError::NotSealed);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SecretError::NotSealed)?;
        let plain = self
            .cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad: row_id.as_bytes() })
            .map_err(|_| SecretError::WrongKey)?;
        String::from_utf8(plain).map_err(|_| SecretError::WrongKey)
    }

    /// Whether a stored value is in the sealed form (older databases kept keys in plaintext).
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(PREFIX)
    }
}

fn decode_key(encoded: &str) -> anyhow::Result<[u8; 32]> {
    let bytes =
        BASE64.decode(encoded.trim().as_bytes()).map_err(|e| anyhow::anyhow!("the key is not valid base64: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| anyhow::anyhow!("the key must be 32 bytes, got {}", b.len()))
}

fn read_or_create_key_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    match std::fs::read_to_string(path) {
        Ok(text) => decode_key(&text).with_context(|| format!("the secret key file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            write_private(path, &format!("{}\n", BASE64.encode(&key)))
                .with_context(|| format!("creating the secret key file {}", path.display()))?;
            tracing::info!(path = %path.display(), "created the key that encrypts provider API keys");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading the secret key file {}", path.display())),
    }
}

/// Creates `path` readable by its owner only; never overwrites.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_row() {
        let a = SecretBox::new(&[7; 32]);
        let b = SecretBox::new(&[8; 32]);
        let sealed = a.seal("row-1", "sk-live-123");
        assert!(SecretBox::is_sealed(&sealed));
        assert!(!sealed.contains("sk-live-123"));
        assert_eq!(a.open("row-1", &sealed).expect("test"), "sk-live-123");
        assert!(matches!(a.open("row-2", &sealed), Err(SecretError::WrongKey)));
        assert!(matches!(b.open("row-1", &sealed), Err(SecretError::WrongKey)));
        assert!(matches!(a.open("row-1", "sk-live-123"), Err(SecretError::NotSealed)));
        // A fresh nonce every time.
        assert_ne!(a.seal("row-1", "x"), a.seal("row-1", "x"));
    }

    #[test]
    fn the_key_file_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("test");
        let path = dir.path().join("nested/secret.key");
        let first = read_or_create_key_file(&path).expect("test");
        assert_eq!(std::fs::metadata(&path).expect("test").permissions().mode() & 0o777, 0o600);
        assert_eq!(read_or_create_key_file(&path).expect("test"), first);
        std::fs::write(&path, "short").expect("test");
        let err = read_or_create_key_file(&path).expect_err("a short key is refused");
        assert!(format!("{err:#}").contains("secret key file"), "{err:#}");
    }
}
