//! Per-workspace NATS credentials, with NATS's decentralised JWT/NKey authentication
//! ("operator mode"), so that a relay can use only its own workspace's subjects (SPEC §8).
//!
//! The trust chain, from the root down:
//!
//! 1. **Operator** — an Ed25519 nkey (`O…`) whose self-signed JWT names the system account. The
//!    server trusts exactly this operator (`operator:` in its configuration). Its seed is needed
//!    only to re-issue the account JWTs (new signing key, revocations): keep it offline.
//! 2. **Accounts**, signed by the operator: `agentplane` (JetStream enabled, every subject of the
//!    deployment lives in it) and the system account `SYS` (server internals, no JetStream).
//!    With `resolver: MEMORY` the server knows only the account JWTs listed in
//!    `resolver_preload`, so no other account can ever connect. The `agentplane` account JWT
//!    lists one **signing key** (`A…`); the account's own identity seed is thrown away after
//!    `bootstrap`, so a leaked signing key can be replaced without changing the account id.
//! 3. **Users**, signed by the account signing key (`issuer_account` names the account): the
//!    orchestrator (publish and subscribe anything in the account, including the JetStream API)
//!    and one user per workspace relay, minted on demand by [`mint_workspace_creds`], whose
//!    permissions allow only `<prefix>.ws.<ws>.>` for publishing, the workspace's request and
//!    cancel subjects plus its own reply inbox `_INBOX_<ws>.>` for subscribing, and one answer
//!    to each request it receives. The server enforces those permissions: a relay asking for
//!    anything else gets a `Permissions Violation` error and nothing is delivered.
//!
//! A user proves its identity by signing the server's nonce with its own seed, so a `.creds` file
//! (JWT + user seed, in the format `nsc` writes) is the whole credential. JWTs carry no secrets;
//! seeds and `.creds` files do, and this module never logs or prints them (the `Debug` impls
//! redact them).
//!
//! The JWTs are encoded here (header, claims, `jti`, Ed25519 signature via `nkeys`) rather than
//! with a JWT library: only three claim shapes are needed. The layout follows the Go
//! `nats-io/jwt/v2` library the server decodes them with, and the tests check it against a real
//! nats-server.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentplane_schema::nats::{Subjects, is_token};
use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::{KeyPair, KeyPairType};
use serde::Serialize;
use sha2::{Digest, Sha512_256};

/// Name of the account every agentplane subject lives in.
pub const ACCOUNT_NAME: &str = "agentplane";
/// Name of the server's system account.
pub const SYSTEM_ACCOUNT_NAME: &str = "SYS";
/// Name of the operator.
pub const OPERATOR_NAME: &str = "agentplane";
/// Name of the orchestrator's user.
pub const ORCHESTRATOR_USER_NAME: &str = "orchestrator";

/// Files [`write_bootstrap`] creates.
pub const SERVER_CONF_FILE: &str = "server.conf";
pub const ORCHESTRATOR_CREDS_FILE: &str = "orchestrator.creds";
pub const ACCOUNT_SIGNING_SEED_FILE: &str = "account-signing.seed";
pub const ACCOUNT_PUBLIC_KEY_FILE: &str = "account.pub";
pub const OPERATOR_SEED_FILE: &str = "operator.seed";

/// How many answers a relay may publish to the reply subject of one request it received: the
/// relay acknowledges a request once (the result goes to the results stream), so one is enough
/// and a relay cannot keep writing into a requester's inbox.
const RELAY_RESPONSES_PER_REQUEST: i64 = 1;
/// How long that answer stays allowed after the request was delivered; the acknowledgement is
/// sent as soon as the relay takes the call, well within this.
const RELAY_RESPONSE_WINDOW: Duration = Duration::from_secs(60);

const JWT_HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
/// The claim format version of `nats-io/jwt/v2`.
const JWT_VERSION: u8 = 2;
/// "Unlimited" in NATS limits.
const NO_LIMIT: i64 = -1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsAuthErrorKind {
    /// The workspace id is not a single subject token.
    InvalidWorkspaceId,
    /// The subject prefix is not a valid literal subject.
    InvalidPrefix,
    /// A seed or public key is malformed or of the wrong kind (e.g. a user seed where an
    /// account seed is expected).
    InvalidKey,
    /// Encoding or signing a JWT failed.
    Encode,
}

/// Why a credential could not be made. The message never contains a seed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct NatsAuthError {
    pub kind: NatsAuthErrorKind,
    pub message: String,
}

impl NatsAuthError {
    fn new(kind: NatsAuthErrorKind, message: impl Into<String>) -> Self {
        NatsAuthError { kind, message: message.into() }
    }
}

/// Generated once (`agentplane nats init`): the operator, the `agentplane` account (JetStream
/// enabled) and the system account, their JWTs, the server configuration that trusts them
/// (`resolver: MEMORY` with `resolver_preload`), and the orchestrator's own user credential.
#[derive(Clone)]
pub struct NatsBootstrap {
    /// The subject prefix the deployment uses (default `ap`).
    pub prefix: String,
    /// Include-able nats-server configuration fragment: `operator`, `system_account`,
    /// `resolver`, `resolver_preload`. Holds JWTs only, no secrets.
    pub server_config: String,
    /// The orchestrator's `.creds` text (secret).
    pub orchestrator_creds: String,
    pub operator_public_key: String,
    pub operator_jwt: String,
    /// Needed only to re-issue the account JWTs; keep it offline (secret).
    pub operator_seed: String,
    /// The `agentplane` account's id (`A…`), the `issuer_account` of every user.
    pub account_public_key: String,
    pub account_jwt: String,
    /// The account signing key that signs users, the orchestrator's and the relays' (secret).
    pub account_signing_seed: String,
    pub system_account_public_key: String,
    pub system_account_jwt: String,
}

impl fmt::Debug for NatsBootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBootstrap")
            .field("prefix", &self.prefix)
            .field("operator_public_key", &self.operator_public_key)
            .field("account_public_key", &self.account_public_key)
            .field("system_account_public_key", &self.system_account_public_key)
            .field("orchestrator_creds", &"<redacted>")
            .field("operator_seed", &"<redacted>")
            .field("account_signing_seed", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What the orchestrator needs at run time to mint relay credentials, as [`write_bootstrap`]
/// stored it.
#[derive(Clone)]
pub struct SigningMaterial {
    pub account_public_key: String,
    /// Secret.
    pub account_signing_seed: String,
}

impl fmt::Debug for SigningMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningMaterial")
            .field("account_public_key", &self.account_public_key)
            .field("account_signing_seed", &"<redacted>")
            .finish()
    }
}

/// Creates the operator, the accounts, the server configuration and the orchestrator's
/// credential for a deployment whose subjects start with `prefix`.
pub fn bootstrap(prefix: &str) -> Result<NatsBootstrap, NatsAuthError> {
    validate_prefix(prefix)?;
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let signing = KeyPair::new_account();
    let system = KeyPair::new_account();

    let operator_jwt = encode_jwt(
        &operator,
        &operator.public_key(),
        OPERATOR_NAME,
        &OperatorNats { system_account: system.public_key(), kind: "operator", version: JWT_VERSION },
    )?;
    let account_jwt = encode_jwt(
        &operator,
        &account.public_key(),
        ACCOUNT_NAME,
        &AccountNats {
            limits: AccountLimits::unlimited(Some(JetStreamLimits::unlimited())),
            signing_keys: vec![signing.public_key()],
            kind: "account",
            version: JWT_VERSION,
        },
    )?;
    // The system account must not have JetStream: the server refuses it there.
    let system_account_jwt = encode_jwt(
        &operator,
        &system.public_key(),
        SYSTEM_ACCOUNT_NAME,
        &AccountNats {
            limits: AccountLimits::unlimited(None),
            signing_keys: Vec::new(),
            kind: "account",
            version: JWT_VERSION,
        },
    )?;

    let orchestrator_creds = mint_user_creds(
        &signing,
        &account.public_key(),
        ORCHESTRATOR_USER_NAME,
        UserPermissions { publish: vec![">".into()], subscribe: vec![">".into()], response: None },
    )?;

    let server_config = server_config_text(
        prefix,
        &operator_jwt,
        &account.public_key(),
        &account_jwt,
        &system.public_key(),
        &system_account_jwt,
    );
    Ok(NatsBootstrap {
        prefix: prefix.to_string(),
        server_config,
        orchestrator_creds,
        operator_public_key: operator.public_key(),
        operator_jwt,
        operator_seed: seed_of(&operator)?,
        account_public_key: account.public_key(),
        account_jwt,
        account_signing_seed: seed_of(&signing)?,
        system_account_public_key: system.public_key(),
        system_account_jwt,
    })
}

/// Writes into `dir` (created, mode 0700, when missing): [`SERVER_CONF_FILE`] (the include-able
/// fragment: `operator`, `system_account`, `resolver`, `resolver_preload`),
/// [`ACCOUNT_PUBLIC_KEY_FILE`], and the secrets [`ORCHESTRATOR_CREDS_FILE`],
/// [`ACCOUNT_SIGNING_SEED_FILE`] and [`OPERATOR_SEED_FILE`] (mode 0600).
///
/// Refuses (`AlreadyExists`, nothing written) when any of those files exists: a second
/// bootstrap over the first would silently invalidate every credential already handed out.
pub fn write_bootstrap(b: &NatsBootstrap, dir: &Path) -> std::io::Result<()> {
    let files: [(&str, String, bool); 5] = [
        (SERVER_CONF_FILE, b.server_config.clone(), false),
        (ACCOUNT_PUBLIC_KEY_FILE, format!("{}\n", b.account_public_key), false),
        (ORCHESTRATOR_CREDS_FILE, b.orchestrator_creds.clone(), true),
        (ACCOUNT_SIGNING_SEED_FILE, format!("{}\n", b.account_signing_seed), true),
        (OPERATOR_SEED_FILE, format!("{}\n", b.operator_seed), true),
    ];
    create_private_dir(dir)?;
    for (name, _, _) in &files {
        let path = dir.join(name);
        if path.symlink_metadata().is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already exists; remove the old NATS bootstrap first", path.display()),
            ));
        }
    }
    for (name, contents, secret) in &files {
        write_new_file(&dir.join(name), contents, *secret)?;
    }
    Ok(())
}

/// Reads back what the orchestrator needs to mint relay credentials from a directory written by
/// [`write_bootstrap`].
pub fn read_signing_material(dir: &Path) -> std::io::Result<SigningMaterial> {
    let account_public_key = std::fs::read_to_string(dir.join(ACCOUNT_PUBLIC_KEY_FILE))?.trim().to_string();
    let account_signing_seed = std::fs::read_to_string(dir.join(ACCOUNT_SIGNING_SEED_FILE))?.trim().to_string();
    Ok(SigningMaterial { account_public_key, account_signing_seed })
}

/// Mints the `.creds` text for one workspace's relay, signed by the account signing key. The
/// relay may publish only `<prefix>.ws.<ws>.>`, subscribe only `<prefix>.ws.<ws>.req`,
/// `<prefix>.ws.<ws>.cancel` and its own inbox `_INBOX_<ws>.>` (so it must connect with that
/// custom inbox prefix), and answer once each request it received; nothing else.
pub fn mint_workspace_creds(
    account_signing_seed: &str,
    account_public_key: &str,
    subjects: &Subjects,
    workspace_id: &str,
) -> Result<String, NatsAuthError> {
    // A workspace id that is not one token would widen the grant: `*` or `>` are wildcards,
    // `a.b` would reach into another workspace's subject space.
    if !is_token(workspace_id) {
        return Err(NatsAuthError::new(
            NatsAuthErrorKind::InvalidWorkspaceId,
            format!("workspace id {workspace_id:?} is not a single subject token (letters, digits, `-`, `_`)"),
        ));
    }
    validate_prefix(subjects.prefix())?;
    let signer = KeyPair::from_seed(account_signing_seed.trim())
        .ok()
        .filter(|k| k.key_pair_type() == KeyPairType::Account)
        .ok_or_else(|| {
            NatsAuthError::new(NatsAuthErrorKind::InvalidKey, "the account signing seed is not an account seed")
        })?;
    mint_user_creds(
        &signer,
        account_public_key,
        &format!("relay-{workspace_id}"),
        relay_permissions(subjects, workspace_id),
    )
}

/// The subjects a workspace's relay may use.
fn relay_permissions(subjects: &Subjects, ws: &str) -> UserPermissions {
    UserPermissions {
        publish: vec![subjects.workspace_all(ws)],
        subscribe: vec![subjects.request(ws), subjects.cancel(ws), format!("{}.>", subjects.relay_inbox_prefix(ws))],
        response: Some(ResponsePermission {
            max: RELAY_RESPONSES_PER_REQUEST,
            ttl: u64::try_from(RELAY_RESPONSE_WINDOW.as_nanos()).unwrap_or(u64::MAX),
        }),
    }
}

fn validate_prefix(prefix: &str) -> Result<(), NatsAuthError> {
    if prefix.split('.').all(is_token) {
        Ok(())
    } else {
        Err(NatsAuthError::new(
            NatsAuthErrorKind::InvalidPrefix,
            format!("subject prefix {prefix:?} must be dot-separated tokens without wildcards"),
        ))
    }
}

fn seed_of(key: &KeyPair) -> Result<String, NatsAuthError> {
    key.seed().map_err(|_| NatsAuthError::new(NatsAuthErrorKind::Encode, "a generated key has no seed"))
}

struct UserPermissions {
    publish: Vec<String>,
    subscribe: Vec<String>,
    response: Option<ResponsePermission>,
}

/// A new user key, its JWT signed by `signer` on behalf of `account_public_key`, as `.creds`.
fn mint_user_creds(
    signer: &KeyPair,
    account_public_key: &str,
    name: &str,
    permissions: UserPermissions,
) -> Result<String, NatsAuthError> {
    let account_ok = KeyPair::from_public_key(account_public_key)
        .map(|k| k.key_pair_type() == KeyPairType::Account)
        .unwrap_or(false);
    if !account_ok {
        return Err(NatsAuthError::new(NatsAuthErrorKind::InvalidKey, "the account public key is not an account key"));
    }
    let user = KeyPair::new_user();
    let nats = UserNats {
        publish: Permission { allow: permissions.publish },
        subscribe: Permission { allow: permissions.subscribe },
        resp: permissions.response,
        // Zero would mean "none" to the server, not "unlimited".
        subs: NO_LIMIT,
        data: NO_LIMIT,
        payload: NO_LIMIT,
        // Set only when a signing key signs: the server then checks the key is one of the
        // account's signing keys. With the identity key it must be absent.
        issuer_account: (signer.public_key() != account_public_key).then(|| account_public_key.to_string()),
        kind: "user",
        version: JWT_VERSION,
    };
    let jwt = encode_jwt(signer, &user.public_key(), name, &nats)?;
    Ok(format_creds(&jwt, &seed_of(&user)?))
}

/// The `.creds` layout `nsc` writes and every NATS client parses.
fn format_creds(jwt: &str, user_seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

fn server_config_text(
    prefix: &str,
    operator_jwt: &str,
    account: &str,
    account_jwt: &str,
    system: &str,
    system_jwt: &str,
) -> String {
    format!(
        "# agentplane NATS trust, generated by `agentplane nats init` (subject prefix `{prefix}`).\n\
         # Include it from nats-server.conf. It holds JWTs only (public); the seeds are in separate files.\n\
         # Only the accounts preloaded below exist: every other account JWT is refused.\n\
         operator: \"{operator_jwt}\"\n\
         system_account: \"{system}\"\n\
         resolver: MEMORY\n\
         resolver_preload: {{\n\
         \x20 # {ACCOUNT_NAME}: every agentplane subject, JetStream enabled\n\
         \x20 \"{account}\": \"{account_jwt}\"\n\
         \x20 # {SYSTEM_ACCOUNT_NAME}: the server's system account\n\
         \x20 \"{system}\": \"{system_jwt}\"\n\
         }}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// JWT encoding (nats-io/jwt v2 layout)

#[derive(Serialize)]
struct Claims<'a, N> {
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    iat: u64,
    iss: String,
    name: &'a str,
    sub: &'a str,
    nats: &'a N,
}

#[derive(Serialize)]
struct OperatorNats {
    system_account: String,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

#[derive(Serialize)]
struct AccountNats {
    limits: AccountLimits,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    signing_keys: Vec<String>,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

#[derive(Serialize)]
struct AccountLimits {
    subs: i64,
    data: i64,
    payload: i64,
    imports: i64,
    exports: i64,
    wildcards: bool,
    conn: i64,
    leaf: i64,
    /// Absent: JetStream disabled for the account.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    jetstream: Option<JetStreamLimits>,
}

impl AccountLimits {
    fn unlimited(jetstream: Option<JetStreamLimits>) -> Self {
        AccountLimits {
            subs: NO_LIMIT,
            data: NO_LIMIT,
            payload: NO_LIMIT,
            imports: NO_LIMIT,
            exports: NO_LIMIT,
            wildcards: true,
            conn: NO_LIMIT,
            leaf: NO_LIMIT,
            jetstream,
        }
    }
}

#[derive(Serialize)]
struct JetStreamLimits {
    mem_storage: i64,
    disk_storage: i64,
    streams: i64,
    consumer: i64,
}

impl JetStreamLimits {
    /// The server's own `jetstream { max_memory_store, max_file_store }` still caps the total.
    fn unlimited() -> Self {
        JetStreamLimits { mem_storage: NO_LIMIT, disk_storage: NO_LIMIT, streams: NO_LIMIT, consumer: NO_LIMIT }
    }
}

#[derive(Serialize)]
struct UserNats {
    #[serde(rename = "pub")]
    publish: Permission,
    #[serde(rename = "sub")]
    subscribe: Permission,
    #[serde(skip_serializing_if = "Option::is_none")]
    resp: Option<ResponsePermission>,
    subs: i64,
    data: i64,
    payload: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer_account: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

#[derive(Serialize)]
struct Permission {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allow: Vec<String>,
}

#[derive(Serialize)]
struct ResponsePermission {
    max: i64,
    /// Nanoseconds (a Go `time.Duration`).
    ttl: u64,
}

/// `header.claims.signature`, each base64url without padding; the signature is `issuer`'s
/// Ed25519 signature of `header.claims`.
fn encode_jwt<N: Serialize>(issuer: &KeyPair, subject: &str, name: &str, nats: &N) -> Result<String, NatsAuthError> {
    let encode_error = |e: serde_json::Error| NatsAuthError::new(NatsAuthErrorKind::Encode, format!("JWT claims: {e}"));
    let iat = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut claims = Claims { jti: None, iat, iss: issuer.public_key(), name, sub: subject, nats };
    // Like the Go library: the id is the base32 SHA-512/256 of the claims before the id is set,
    // so two tokens with different contents never share one.
    let unidentified = serde_json::to_vec(&claims).map_err(encode_error)?;
    claims.jti = Some(BASE32_NOPAD.encode(&Sha512_256::digest(&unidentified)));
    let payload = serde_json::to_vec(&claims).map_err(encode_error)?;
    let signing_input =
        format!("{}.{}", BASE64URL_NOPAD.encode(JWT_HEADER.as_bytes()), BASE64URL_NOPAD.encode(&payload));
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| NatsAuthError::new(NatsAuthErrorKind::Encode, format!("signing a JWT: {e}")))?;
    Ok(format!("{signing_input}.{}", BASE64URL_NOPAD.encode(&signature)))
}

// ---------------------------------------------------------------------------------------------
// Files

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `path` (never overwrites); secrets get mode 0600 from the start, so there is no moment
/// where they are readable by others.
fn write_new_file(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if secret { 0o600 } else { 0o644 });
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    //! Against a real nats-server running the generated configuration: what the server accepts
    //! and refuses is the behaviour under test, so nothing here is mocked.

    use std::time::Duration;

    use agentplane_schema::nats::{ACK, RELAY_QUEUE, RESULTS_STREAM};
    use agentplane_tests::NatsServer;
    use async_nats::{ConnectErrorKind, ConnectOptions, Event, RequestErrorKind, ServerError, Subscriber, jetstream};
    use futures::{FutureExt, StreamExt};
    use tokio::sync::mpsc;

    use super::*;

    /// Upper bound for anything the server should do promptly; never a synchronisation sleep.
    const WAIT: Duration = Duration::from_secs(10);

    struct Conn {
        client: async_nats::Client,
        events: mpsc::UnboundedReceiver<Event>,
    }

    async fn connect(url: &str, creds: &str, inbox_prefix: Option<&str>) -> Result<Conn, async_nats::ConnectError> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut options = ConnectOptions::new().credentials(creds).expect("creds parse").event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
        if let Some(prefix) = inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        let client = options.connect(url).await?;
        Ok(Conn { client, events })
    }

    async fn connect_relay(url: &str, creds: &str, ws: &str) -> Conn {
        let inbox = Subjects::default().relay_inbox_prefix(ws);
        connect(url, creds, Some(&inbox)).await.expect("the relay's credential is accepted")
    }

    fn relay_creds(b: &NatsBootstrap, ws: &str) -> String {
        mint_workspace_creds(&b.account_signing_seed, &b.account_public_key, &Subjects::default(), ws).expect("mint")
    }

    /// A subject nobody subscribes to, in the orchestrator's and in relay A's publish rights.
    const ORCHESTRATOR_SYNC: &str = "sync.orchestrator";
    const RELAY_A_SYNC: &str = "ap.ws.A.sync";

    /// A round trip through the server. `flush` only writes to the socket, and the server reads
    /// each connection on its own, so another connection's message could overtake a fresh
    /// subscription. A request nobody listens to comes back as "no responders" only after the
    /// server has processed everything this connection sent before it.
    async fn sync(client: &async_nats::Client, subject: &str) {
        let answer = tokio::time::timeout(WAIT, client.request(subject.to_string(), "sync".into()))
            .await
            .expect("the server answers within the wait");
        match answer {
            Err(err) => assert_eq!(err.kind(), RequestErrorKind::NoResponders, "sync on {subject}: {err}"),
            Ok(message) => panic!("sync subject {subject} has a listener: {:?}", message.subject),
        }
    }

    async fn next_message(sub: &mut Subscriber) -> async_nats::Message {
        tokio::time::timeout(WAIT, sub.next()).await.expect("a message within the wait").expect("subscription open")
    }

    /// Waits for the server's `-ERR` naming exactly this violation; other events are skipped.
    async fn expect_server_error(conn: &mut Conn, expected: &str) {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(event) = conn.events.recv().await {
                if let Event::ServerError(ServerError::Other(message)) = &event
                    && message == expected
                {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(matches!(found, Ok(true)), "the server did not report `{expected}`");
    }

    fn subscribe_violation(subject: &str) -> String {
        format!("Permissions Violation for Subscription to \"{subject}\"")
    }

    fn publish_violation(subject: &str) -> String {
        format!("Permissions Violation for Publish to \"{subject}\"")
    }

    /// The claims part of a JWT, as JSON.
    fn claims_of(jwt: &str) -> serde_json::Value {
        let payload = jwt.split('.').nth(1).expect("three parts");
        serde_json::from_slice(&BASE64URL_NOPAD.decode(payload.as_bytes()).expect("base64url")).expect("json")
    }

    fn jwt_of(creds: &str) -> &str {
        creds.lines().nth(1).expect("the JWT line")
    }

    #[test]
    fn jwts_are_signed_by_their_issuer_and_identified_by_their_contents() {
        let b = bootstrap("ap").expect("bootstrap");
        let relay = relay_creds(&b, "A");
        for jwt in [b.operator_jwt.as_str(), b.account_jwt.as_str(), b.system_account_jwt.as_str(), jwt_of(&relay)] {
            let parts: Vec<&str> = jwt.split('.').collect();
            assert_eq!(parts.len(), 3);
            assert_eq!(BASE64URL_NOPAD.decode(parts[0].as_bytes()).expect("header"), JWT_HEADER.as_bytes());
            let claims = claims_of(jwt);
            let issuer = KeyPair::from_public_key(claims["iss"].as_str().expect("iss")).expect("issuer key");
            let signature = BASE64URL_NOPAD.decode(parts[2].as_bytes()).expect("signature");
            issuer.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).expect("valid signature");
            assert_eq!(claims["nats"]["version"], 2);
            // The id is the hash of the claims as serialised without it (`jti` comes first).
            let jti = claims["jti"].as_str().expect("jti");
            let raw = String::from_utf8(BASE64URL_NOPAD.decode(parts[1].as_bytes()).expect("claims")).expect("utf-8");
            let without = raw.replacen(&format!("\"jti\":\"{jti}\","), "", 1);
            assert_ne!(raw, without);
            assert_eq!(jti, BASE32_NOPAD.encode(&Sha512_256::digest(without.as_bytes())));
        }
        let operator = claims_of(&b.operator_jwt);
        assert_eq!(operator["iss"], operator["sub"]);
        assert_eq!(operator["nats"]["type"], "operator");
        assert_eq!(operator["nats"]["system_account"], b.system_account_public_key.as_str());
        let account = claims_of(&b.account_jwt);
        assert_eq!(account["iss"], b.operator_public_key.as_str());
        assert_eq!(account["sub"], b.account_public_key.as_str());
        assert_eq!(account["nats"]["limits"]["disk_storage"], -1);
        assert_eq!(account["nats"]["limits"]["consumer"], -1);
        let system = claims_of(&b.system_account_jwt);
        assert!(system["nats"]["limits"].get("mem_storage").is_none(), "no JetStream in the system account");
        // The seeds are never shown.
        let shown = format!("{b:?}");
        assert!(!shown.contains(&b.account_signing_seed) && !shown.contains(&b.operator_seed));
        assert!(!shown.contains(&b.orchestrator_creds));
    }

    #[test]
    fn relay_credential_grants_exactly_its_workspace() {
        let b = bootstrap("ap").expect("bootstrap");
        let creds = relay_creds(&b, "A");
        assert!(creds.starts_with("-----BEGIN NATS USER JWT-----\n"));
        assert!(creds.contains("\n------END NATS USER JWT------\n"));
        assert!(creds.contains("\n-----BEGIN USER NKEY SEED-----\nSU"));
        assert!(creds.contains("\n------END USER NKEY SEED------\n"));
        let claims = claims_of(jwt_of(&creds));
        let nats = &claims["nats"];
        assert_eq!(nats["type"], "user");
        assert_eq!(claims["name"], "relay-A");
        assert_eq!(nats["issuer_account"], b.account_public_key.as_str());
        assert_ne!(claims["iss"], b.account_public_key.as_str(), "signed by the signing key, not the identity key");
        assert_eq!(nats["pub"], serde_json::json!({"allow": ["ap.ws.A.>"]}));
        assert_eq!(nats["sub"], serde_json::json!({"allow": ["ap.ws.A.req", "ap.ws.A.cancel", "_INBOX_A.>"]}));
        assert_eq!(nats["resp"]["max"], 1);
        assert!(nats["pub"].get("deny").is_none() && nats.get("bearer_token").is_none());
    }

    #[test]
    fn a_credential_is_bound_to_one_workspace_token() {
        let b = bootstrap("ap").expect("bootstrap");
        for bad in ["a.b", "*", ">", "", "a b", "A.>", "A.*"] {
            let err = mint_workspace_creds(&b.account_signing_seed, &b.account_public_key, &Subjects::default(), bad)
                .expect_err(bad);
            assert_eq!(err.kind, NatsAuthErrorKind::InvalidWorkspaceId, "{bad:?}");
        }
        let err = mint_workspace_creds(&b.account_signing_seed, &b.account_public_key, &Subjects::new("ap.*"), "A")
            .expect_err("wildcard prefix");
        assert_eq!(err.kind, NatsAuthErrorKind::InvalidPrefix);
        assert_eq!(bootstrap("ap.>").expect_err("wildcard prefix").kind, NatsAuthErrorKind::InvalidPrefix);

        // Wrong kinds of keys: a user seed, the operator seed, garbage; an account seed as the key.
        let user_seed = KeyPair::new_user().seed().expect("seed");
        for seed in [user_seed.as_str(), b.operator_seed.as_str(), "not a seed"] {
            let err = mint_workspace_creds(seed, &b.account_public_key, &Subjects::default(), "A").expect_err("seed");
            assert_eq!(err.kind, NatsAuthErrorKind::InvalidKey);
            assert!(!err.to_string().contains(seed), "the error must not echo the seed");
        }
        let err = mint_workspace_creds(&b.account_signing_seed, &b.operator_public_key, &Subjects::default(), "A")
            .expect_err("operator key as account");
        assert_eq!(err.kind, NatsAuthErrorKind::InvalidKey);

        // Another prefix moves every grant with it.
        let creds =
            mint_workspace_creds(&b.account_signing_seed, &b.account_public_key, &Subjects::new("x.y"), "w-1_2")
                .expect("mint");
        let nats = &claims_of(jwt_of(&creds))["nats"];
        assert_eq!(nats["pub"]["allow"], serde_json::json!(["x.y.ws.w-1_2.>"]));
        assert_eq!(
            nats["sub"]["allow"],
            serde_json::json!(["x.y.ws.w-1_2.req", "x.y.ws.w-1_2.cancel", "_INBOX_w-1_2.>"])
        );
    }

    #[tokio::test]
    async fn orchestrator_has_the_whole_account_including_jetstream() {
        let b = bootstrap("ap").expect("bootstrap");
        let nats = NatsServer::start_with_config(&b.server_config);
        let orchestrator = connect(&nats.url(), &b.orchestrator_creds, None).await.expect("orchestrator connects");
        let client = &orchestrator.client;

        let mut anything = client.subscribe("anything.>").await.expect("subscribe");
        let mut chats = client.subscribe("ap.chat.*.cmd").await.expect("subscribe");
        client.flush().await.expect("flush");
        client.publish("anything.at.all", "x".into()).await.expect("publish");
        client.publish("ap.chat.c1.cmd", "y".into()).await.expect("publish");
        assert_eq!(next_message(&mut anything).await.subject.as_str(), "anything.at.all");
        assert_eq!(next_message(&mut chats).await.subject.as_str(), "ap.chat.c1.cmd");

        let subjects = Subjects::default();
        let js = jetstream::new(client.clone());
        js.create_stream(jetstream::stream::Config {
            name: RESULTS_STREAM.to_string(),
            subjects: vec![subjects.all_results()],
            ..Default::default()
        })
        .await
        .expect("the orchestrator creates the results stream");
        let ack = js.publish(subjects.result("w1", "c1"), "done".into()).await.expect("publish").await.expect("stored");
        assert_eq!(ack.stream, RESULTS_STREAM);
    }

    #[tokio::test]
    async fn relay_works_within_its_workspace() {
        let b = bootstrap("ap").expect("bootstrap");
        let nats = NatsServer::start_with_config(&b.server_config);
        let subjects = Subjects::default();
        let orchestrator = connect(&nats.url(), &b.orchestrator_creds, None).await.expect("orchestrator connects");
        let orch = orchestrator.client.clone();
        let relay = connect_relay(&nats.url(), &relay_creds(&b, "A"), "A").await;

        // Requests and cancels reach the relay.
        let mut requests =
            relay.client.queue_subscribe(subjects.request("A"), RELAY_QUEUE.to_string()).await.expect("subscribe");
        let mut cancels = relay.client.subscribe(subjects.cancel("A")).await.expect("subscribe");
        sync(&relay.client, RELAY_A_SYNC).await;
        orch.publish(subjects.request("A"), "tool".into()).await.expect("publish");
        orch.publish(subjects.cancel("A"), "c1".into()).await.expect("publish");
        assert_eq!(next_message(&mut requests).await.payload.as_ref(), b"tool");
        assert_eq!(next_message(&mut cancels).await.payload.as_ref(), b"c1");

        // Output, results and hellos reach the orchestrator.
        let mut watch = orch.subscribe(subjects.workspace_all("A")).await.expect("subscribe");
        sync(&orch, ORCHESTRATOR_SYNC).await;
        relay.client.publish(subjects.output("A", "c1"), "out".into()).await.expect("publish");
        relay.client.publish(subjects.result("A", "c1"), "res".into()).await.expect("publish");
        relay.client.publish(subjects.hello("A"), "hi".into()).await.expect("publish");
        relay.client.flush().await.expect("flush");
        for expected in [subjects.output("A", "c1"), subjects.result("A", "c1"), subjects.hello("A")] {
            assert_eq!(next_message(&mut watch).await.subject.as_str(), expected);
        }
        drop(watch);

        // The relay answers a request it received (response permission).
        let relay_client = relay.client.clone();
        let responder = tokio::spawn(async move {
            let request = next_message(&mut requests).await;
            let reply = request.reply.expect("a request has a reply subject");
            relay_client.publish(reply, ACK.into()).await.expect("publish");
            relay_client.flush().await.expect("flush");
        });
        let answer = tokio::time::timeout(WAIT, orch.request(subjects.request("A"), "call".into()))
            .await
            .expect("answered within the wait")
            .expect("answered");
        assert_eq!(answer.payload.as_ref(), ACK);
        responder.await.expect("responder");

        // Its own inbox works: a request from the relay gets its answer on `_INBOX_A.…`.
        let mut hellos = orch.subscribe(subjects.hello("A")).await.expect("subscribe");
        sync(&orch, ORCHESTRATOR_SYNC).await;
        let orch_answerer = orch.clone();
        let answerer = tokio::spawn(async move {
            let hello = next_message(&mut hellos).await;
            let reply = hello.reply.expect("reply subject");
            assert!(reply.as_str().starts_with("_INBOX_A."), "the relay uses its own inbox, got {reply}");
            orch_answerer.publish(reply, "welcome".into()).await.expect("publish");
        });
        let welcome = tokio::time::timeout(WAIT, relay.client.request(subjects.hello("A"), "hello".into()))
            .await
            .expect("answered within the wait")
            .expect("answered");
        assert_eq!(welcome.payload.as_ref(), b"welcome");
        answerer.await.expect("answerer");

        // The relay can store a result in the results stream and get the stream's acknowledgement.
        jetstream::new(orch.clone())
            .create_stream(jetstream::stream::Config {
                name: RESULTS_STREAM.to_string(),
                subjects: vec![subjects.all_results()],
                ..Default::default()
            })
            .await
            .expect("stream");
        let ack = jetstream::new(relay.client.clone())
            .publish(subjects.result("A", "c2"), "result".into())
            .await
            .expect("publish")
            .await
            .expect("the relay's result is stored and acknowledged");
        assert_eq!(ack.stream, RESULTS_STREAM);
    }

    /// ACCEPTANCE: the server itself refuses every subscription outside the relay's workspace.
    #[tokio::test]
    async fn server_denies_a_relay_subscriptions_outside_its_workspace() {
        let b = bootstrap("ap").expect("bootstrap");
        let nats = NatsServer::start_with_config(&b.server_config);
        let subjects = Subjects::default();
        let orchestrator = connect(&nats.url(), &b.orchestrator_creds, None).await.expect("orchestrator connects");
        let mut relay = connect_relay(&nats.url(), &relay_creds(&b, "A"), "A").await;

        let denied =
            ["ap.ws.B.req", "ap.ws.>", ">", "_INBOX.>", "_INBOX_B.>", "ap.ws.*.req", "ap.ws.B.cancel", "ap.chat.x.ev"];
        let mut denied_subs = Vec::new();
        for subject in denied {
            // The client registers it locally; only the server knows it is not allowed.
            let sub = relay.client.subscribe(subject).await.expect("client-side subscribe");
            relay.client.flush().await.expect("flush");
            expect_server_error(&mut relay, &subscribe_violation(subject)).await;
            denied_subs.push((subject, sub));
        }

        // Nothing published there reaches the relay. The marker goes to an allowed subscription
        // after all of them; one connection's messages are dispatched in order, so once the
        // marker is in, anything sent to the denied subscriptions would already be queued.
        let mut allowed = relay.client.subscribe(subjects.request("A")).await.expect("subscribe");
        sync(&relay.client, RELAY_A_SYNC).await;
        let orch = &orchestrator.client;
        for subject in ["ap.ws.B.req", "ap.ws.B.cancel", "_INBOX.x", "_INBOX_B.x", "ap.chat.x.ev", "ap.ws.C.req"] {
            orch.publish(subject, "secret".into()).await.expect("publish");
        }
        orch.publish(subjects.request("A"), "marker".into()).await.expect("publish");
        assert_eq!(next_message(&mut allowed).await.payload.as_ref(), b"marker");
        for (subject, sub) in &mut denied_subs {
            assert!(sub.next().now_or_never().is_none(), "{subject} delivered a message to the relay");
        }
    }

    /// ACCEPTANCE: the server itself refuses every publication outside the relay's workspace.
    #[tokio::test]
    async fn server_denies_a_relay_publications_outside_its_workspace() {
        let b = bootstrap("ap").expect("bootstrap");
        let nats = NatsServer::start_with_config(&b.server_config);
        let subjects = Subjects::default();
        let orchestrator = connect(&nats.url(), &b.orchestrator_creds, None).await.expect("orchestrator connects");
        let mut relay = connect_relay(&nats.url(), &relay_creds(&b, "A"), "A").await;

        // The orchestrator sees everything in the account.
        let mut everything = orchestrator.client.subscribe(">").await.expect("subscribe");
        // Its own message coming back proves the subscription is in place (see `sync`).
        orchestrator.client.publish(ORCHESTRATOR_SYNC, "ready".into()).await.expect("publish");
        assert_eq!(next_message(&mut everything).await.subject.as_str(), ORCHESTRATOR_SYNC);
        let denied =
            ["ap.chat.x.cmd", "ap.ws.B.req", "ap.ws.B.res.c1", "_INBOX.x", "_INBOX_B.x", "$JS.API.STREAM.LIST"];
        for subject in denied {
            relay.client.publish(subject, "forged".into()).await.expect("client-side publish");
            relay.client.flush().await.expect("flush");
            expect_server_error(&mut relay, &publish_violation(subject)).await;
        }
        // The relay's publications arrive in order: the first one the orchestrator sees must be
        // the marker sent after all the denied ones.
        relay.client.publish(subjects.hello("A"), "marker".into()).await.expect("publish");
        relay.client.flush().await.expect("flush");
        let first = next_message(&mut everything).await;
        assert_eq!(first.subject.as_str(), subjects.hello("A"), "a denied publication got through");
    }

    /// A relay may answer a request once, not write into the requester's inbox at will.
    #[tokio::test]
    async fn relay_answers_each_request_at_most_once() {
        let b = bootstrap("ap").expect("bootstrap");
        let nats = NatsServer::start_with_config(&b.server_config);
        let subjects = Subjects::default();
        let orchestrator = connect(&nats.url(), &b.orchestrator_creds, None).await.expect("orchestrator connects");
        let mut relay = connect_relay(&nats.url(), &relay_creds(&b, "A"), "A").await;
        let mut requests = relay.client.subscribe(subjects.request("A")).await.expect("subscribe");
        sync(&relay.client, RELAY_A_SYNC).await;
        let orch = &orchestrator.client;
        let reply = "_INBOX.orchestrator.1";
        let mut replies = orch.subscribe(reply).await.expect("subscribe");
        let mut hellos = orch.subscribe(subjects.hello("A")).await.expect("subscribe");
        sync(orch, ORCHESTRATOR_SYNC).await;

        orch.publish_with_reply(subjects.request("A"), reply, "call".into()).await.expect("publish");
        let request = next_message(&mut requests).await;
        assert_eq!(request.reply.as_ref().map(|r| r.as_str()), Some(reply));
        relay.client.publish(reply, "first".into()).await.expect("publish");
        relay.client.publish(reply, "second".into()).await.expect("publish");
        relay.client.flush().await.expect("flush");
        expect_server_error(&mut relay, &publish_violation(reply)).await;
        relay.client.publish(subjects.hello("A"), "marker".into()).await.expect("publish");
        relay.client.flush().await.expect("flush");
        assert_eq!(next_message(&mut replies).await.payload.as_ref(), b"first");
        // The marker was published after the second answer: once it is in, the second answer
        // would be queued too if the server had let it through.
        assert_eq!(next_message(&mut hellos).await.payload.as_ref(), b"marker");
        assert!(replies.next().now_or_never().is_none(), "a second answer got through");
    }

    #[tokio::test]
    async fn credentials_from_outside_the_trusted_account_are_refused_at_connect() {
        let b = bootstrap("ap").expect("bootstrap");
        let nats = NatsServer::start_with_config(&b.server_config);
        let stranger = bootstrap("ap").expect("another deployment");

        // A different operator and account altogether.
        let foreign = relay_creds(&stranger, "A");
        // A key the account never listed, claiming to sign for it (the account id is public).
        let forged =
            mint_workspace_creds(&stranger.account_signing_seed, &b.account_public_key, &Subjects::default(), "A")
                .expect("mint");
        for (what, creds) in [
            ("foreign relay", foreign.as_str()),
            ("foreign orchestrator", &stranger.orchestrator_creds),
            ("forged", &forged),
        ] {
            let err = match connect(&nats.url(), creds, Some("_INBOX_A")).await {
                Ok(_) => panic!("{what} credential was accepted"),
                Err(err) => err,
            };
            assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation, "{what}: {err}");
        }
        // The genuine one still connects.
        connect_relay(&nats.url(), &relay_creds(&b, "A"), "A").await;
    }

    #[tokio::test]
    async fn bootstrap_files_are_written_once_and_read_back() {
        let b = bootstrap("ap").expect("bootstrap");
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("agentplane");
        write_bootstrap(&b, &dir).expect("write");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| dir.join(name).metadata().expect("file").permissions().mode() & 0o777;
            for secret in [ORCHESTRATOR_CREDS_FILE, ACCOUNT_SIGNING_SEED_FILE, OPERATOR_SEED_FILE] {
                assert_eq!(mode(secret), 0o600, "{secret}");
            }
            assert_eq!(dir.metadata().expect("dir").permissions().mode() & 0o077, 0);
        }
        assert_eq!(std::fs::read_to_string(dir.join(SERVER_CONF_FILE)).expect("read"), b.server_config);
        assert_eq!(std::fs::read_to_string(dir.join(ORCHESTRATOR_CREDS_FILE)).expect("read"), b.orchestrator_creds);

        // A second bootstrap over the first would orphan every credential: refused, untouched.
        let again = bootstrap("ap").expect("bootstrap");
        let err = write_bootstrap(&again, &dir).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(dir.join(SERVER_CONF_FILE)).expect("read"), b.server_config);

        let material = read_signing_material(&dir).expect("read back");
        assert_eq!(material.account_public_key, b.account_public_key);
        assert!(!format!("{material:?}").contains(&material.account_signing_seed));
        let creds = mint_workspace_creds(
            &material.account_signing_seed,
            &material.account_public_key,
            &Subjects::default(),
            "A",
        )
        .expect("mint from the files");

        // The shipped example configuration includes the fragment and is valid for the server.
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/nats-server.conf"))
            .expect("deploy/nats/nats-server.conf");
        let store = root.path().join("jetstream");
        let example = example.replace("/var/lib/nats/jetstream", &store.display().to_string());
        let conf = root.path().join("nats-server.conf");
        std::fs::write(&conf, example).expect("write");
        let binary = agentplane_tests::nats::nats_server_binary();
        let checked = std::process::Command::new(&binary).arg("-t").arg("-c").arg(&conf).output().expect("run");
        assert!(
            checked.status.success(),
            "nats-server -t rejected the example: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );

        // And a server started from the written fragment accepts credentials minted from the files.
        // (nats-server resolves `include` relative to the including file, so pass the text.)
        let fragment = std::fs::read_to_string(dir.join(SERVER_CONF_FILE)).expect("read");
        let nats = NatsServer::start_with_config(&fragment);
        connect_relay(&nats.url(), &creds, "A").await;
        connect(&nats.url(), &std::fs::read_to_string(dir.join(ORCHESTRATOR_CREDS_FILE)).expect("read"), None)
            .await
            .expect("orchestrator connects with the written creds");
    }
}
