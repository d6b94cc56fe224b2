//! API keys and tenants. A keys file maps each key to a tenant and a role; a tenant sees its own
//! adapters, bundles and experiments plus shared ones, and anything else does not exist for it.
//! Without a keys file the server is open: every caller is an admin of no tenant.
//!
//! Keys file (TOML):
//! ```toml
//! [[keys]]
//! key = "sk-acme-1"
//! tenant = "acme"
//! role = "user"     # or "admin": operates the server: sees every tenant and administers
//!                   # adapters and merges; or "metrics": may scrape /metrics and nothing else
//! ```
//!
//! With keys configured, `/metrics` (which names every tenant's adapters and experiments) needs
//! an admin or metrics key; `/health` and `/ready` stay open.

use std::collections::HashMap;
use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::state::AppState;
use crate::adapters::Owner;
use crate::server::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
    /// Scrapes `/metrics`; no other route.
    Metrics,
}

/// The one route a metrics key may call.
pub const METRICS_PATH: &str = "/metrics";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `None` when the server runs without keys.
    pub tenant: Option<String>,
    pub role: Role,
    /// A fingerprint of the key presented (never the key itself); `None` on an open server.
    pub key_id: Option<String>,
}

impl Caller {
    pub const OPEN: Caller = Caller {
        tenant: None,
        role: Role::Admin,
        key_id: None,
    };

    /// The view of `owner` itself: what a bundle or an experiment arm it configured resolves
    /// under. A shared owner is the operator, who sees every name.
    pub fn owner(owner: &Owner) -> Caller {
        match owner {
            Owner::Tenant(t) => Caller {
                tenant: Some(t.clone()),
                role: Role::User,
                key_id: None,
            },
            Owner::Shared => Caller::OPEN,
        }
    }

    /// Whether something owned by `owner` exists for this caller. Admins operate the whole
    /// server and see every tenant's names.
    pub fn can_see(&self, owner: &Owner) -> bool {
        match (owner, &self.tenant) {
            _ if self.role == Role::Admin => true,
            (Owner::Shared, _) | (_, None) => true,
            (Owner::Tenant(t), Some(mine)) => t == mine,
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::User | Role::Metrics => {
                Err(ApiError::Forbidden("this operation needs an admin key"))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    tenant: String,
    role: Role,
}

/// The API keys, or none (open server).
#[derive(Debug, Default)]
pub struct Keys {
    by_key: Option<HashMap<String, Caller>>,
}

impl Keys {
    pub fn open() -> Self {
        Self { by_key: None }
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: KeysFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut by_key = HashMap::new();
        for entry in file.keys {
            if entry.key.len() < 8 {
                return Err(format!(
                    "{}: key of tenant {} is shorter than 8 characters",
                    path.display(),
                    entry.tenant
                ));
            }
            let caller = Caller {
                tenant: Some(entry.tenant),
                role: entry.role,
                key_id: Some(fingerprint(&entry.key)),
            };
            if by_key.insert(entry.key, caller).is_some() {
                return Err(format!("{}: a key appears twice", path.display()));
            }
        }
        Ok(Self {
            by_key: Some(by_key),
        })
    }

    pub fn is_open(&self) -> bool {
        self.by_key.is_none()
    }

    /// The caller presenting `Authorization: Bearer <key>` (or `None` for no header).
    pub fn caller(&self, bearer: Option<&str>) -> Result<Caller, ApiError> {
        let Some(keys) = &self.by_key else {
            return Ok(Caller::OPEN);
        };
        bearer
            .and_then(|k| keys.get(k))
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

/// A short, stable fingerprint of a key, safe to keep and log.
fn fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let caller = state.keys.caller(bearer)?;
        if caller.role == Role::Metrics && parts.uri.path() != METRICS_PATH {
            return Err(ApiError::Forbidden(
                "a metrics key may only scrape /metrics",
            ));
        }
        Ok(caller)
    }
}
