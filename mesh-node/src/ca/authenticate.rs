//! Who is calling the CA: a node, proven locally by its per-node token (a file the node and
//! the CA share, `<node>.token` in the CA's token folder) or, on Kubernetes, by the service
//! account token of the node agent's pod (audience `weft-ca`), checked with a TokenReview:
//! the API server says whose token it is and, for a token bound to a pod, which node that pod
//! runs on. Every failure has a reason for the CA's log; the caller learns none of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use sha2::{Digest, Sha256};
use tunnel_proto::file_trust::{Exposure, check_file};

/// The audience a node's token must be minted for.
pub const AUDIENCE: &str = "weft-ca";

/// Where a bound service account token names its pod's node (Kubernetes 1.30 and later).
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Why a caller was not taken for a node.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the request's authorization metadata")]
    NoToken,
    #[error("the token is not any node's (no file in {folder} holds it)")]
    UnknownToken { folder: PathBuf },
    #[error("the token folder {folder} cannot be read: {reason}")]
    Folder { folder: PathBuf, reason: String },
    #[error("the TokenReview could not be made: {0}")]
    Review(String),
    #[error("the API server does not accept the token: {0}")]
    NotAuthenticated(String),
    #[error("the token is not for audience {AUDIENCE} (it is for {0})")]
    WrongAudience(String),
    #[error("the token is {user}'s, not a node agent's (allowed: {allowed})")]
    NotANodeAgent { user: String, allowed: String },
    #[error(
        "the token of {user} names no node ({NODE_NAME_EXTRA}): it must be a pod's bound token (a projected volume, Kubernetes 1.30 or later)"
    )]
    NoNode { user: String },
}

/// How the CA authenticates its callers.
pub enum Authenticator {
    Tokens(NodeTokens),
    Kubernetes(TokenReviewer),
}

impl Authenticator {
    /// The node `token` proves the caller to be.
    pub async fn node(&self, token: &str) -> Result<String, AuthError> {
        match self {
            Authenticator::Tokens(tokens) => tokens.node(token),
            Authenticator::Kubernetes(reviewer) => reviewer.node(token).await,
        }
    }
}

/// Per-node tokens from a folder: `<node>.token`, each its owner's alone (mode 0600).
pub struct NodeTokens {
    folder: PathBuf,
    known: Mutex<Known>,
}

/// The tokens read, and when the folder was last read.
struct Known {
    /// SHA-256 of each token -> its node; looked up by digest, so comparing leaks no timing.
    by_digest: HashMap<[u8; 32], String>,
    read_at: Instant,
}

/// A token not known is looked up in the folder again at most this often (a node added while
/// the CA runs), so unknown tokens cannot make the CA read the folder on every request.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Largest token file read.
const TOKEN_LIMIT: u64 = 4096;

impl NodeTokens {
    /// Reads the folder's tokens now; a bad folder is an error, a bad file is skipped with a
    /// warning.
    pub fn load(folder: &Path) -> Result<NodeTokens, AuthError> {
        let tokens = NodeTokens {
            folder: folder.to_owned(),
            known: Mutex::new(Known {
                by_digest: read_tokens(folder)?,
                read_at: Instant::now(),
            }),
        };
        Ok(tokens)
    }

    /// How many nodes have a token.
    pub fn len(&self) -> usize {
        self.lock().by_digest.len()
    }

    /// Whether no node has a token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        // Nothing panics while holding it; a poisoned map is still a map.
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn node(&self, token: &str) -> Result<String, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let mut guard = self.lock();
        if let Some(node) = guard.by_digest.get(&digest) {
            return Ok(node.clone());
        }
        if guard.read_at.elapsed() >= RELOAD_AT_MOST_EVERY {
            guard.read_at = Instant::now();
            match read_tokens(&self.folder) {
                Ok(fresh) => guard.by_digest = fresh,
                Err(error) => tracing::warn!("{error}; the tokens read before stay"),
            }
            if let Some(node) = guard.by_digest.get(&digest) {
                return Ok(node.clone());
            }
        }
        Err(AuthError::UnknownToken {
            folder: self.folder.clone(),
        })
    }
}

fn read_tokens(folder: &Path) -> Result<HashMap<[u8; 32], String>, AuthError> {
    let failed = |reason: String| AuthError::Folder {
        folder: folder.to_owned(),
        reason,
    };
    check_file(folder, Exposure::Trusted).map_err(|e| failed(e.to_string()))?;
    let mut tokens = HashMap::new();
    for entry in std::fs::read_dir(folder).map_err(|e| failed(e.to_string()))? {
        let path = entry.map_err(|e| failed(e.to_string()))?.path();
        let Some(node) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".token"))
        else {
            continue;
        };
        match read_token(&path) {
            Ok(token) => {
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                tokens.insert(digest, node.to_owned());
            }
            Err(reason) => tracing::warn!(path = %path.display(), "node token skipped: {reason}"),
        }
    }
    Ok(tokens)
}

fn read_token(path: &Path) -> Result<String, String> {
    use std::io::Read;
    check_file(path, Exposure::Secret).map_err(|e| e.to_string())?;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(TOKEN_LIMIT).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    let token = text.trim();
    if token.len() < 16 {
        return Err("shorter than 16 characters".into());
    }
    Ok(token.to_owned())
}

/// Writes a new random token for `node` into `folder` (mode 0600) unless one is there; returns
/// its path.
pub fn create_node_token(folder: &Path, node: &str) -> std::io::Result<PathBuf> {
    let valid = !node.is_empty()
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !node.starts_with('.');
    if !valid {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{node:?} is not a node name"),
        ));
    }
    let path = folder.join(format!("{node}.token"));
    if path.exists() {
        return Ok(path);
    }
    let mut bytes = [0u8; 32];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| std::io::Error::other("no secure random numbers"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    tunnel_proto::file_trust::write_secret(&path, format!("{token}\n").as_bytes())?;
    Ok(path)
}

/// Checks service account tokens with the API server.
pub struct TokenReviewer {
    client: kube::Client,
    /// The users a node agent's token belongs to: `system:serviceaccount:<ns>:<name>`.
    node_agents: Vec<String>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, node_agents: Vec<String>) -> TokenReviewer {
        TokenReviewer {
            client,
            node_agents,
        }
    }

    async fn node(&self, token: &str) -> Result<String, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.trim().to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let reviewed = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::NotAuthenticated(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated, no reason given".into()),
            ));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| a == AUDIENCE) {
            return Err(AuthError::WrongAudience(audiences.join(", ")));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        if !self.node_agents.contains(&name) {
            return Err(AuthError::NotANodeAgent {
                user: name,
                allowed: self.node_agents.join(", "),
            });
        }
        user.extra
            .as_ref()
            .and_then(|extra| extra.get(NODE_NAME_EXTRA))
            .and_then(|nodes| nodes.first())
            .filter(|node| !node.is_empty())
            .cloned()
            .ok_or(AuthError::NoNode { user: name })
    }
}
