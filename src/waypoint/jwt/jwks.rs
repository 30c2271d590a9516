//! The issuers' key sets: where a rule's keys come from, fetching them, caching and
//! refreshing them.
//!
//! Owns [`JwksCache`] and its [`JwksConfig`]: inline `jwks` (parsed once), `jwksUri` and
//! OpenID discovery (`<issuer>/.well-known/openid-configuration`, then its `jwks_uri`),
//! fetched over HTTP(S) with the rule's timeout, up to 10 redirects and a size limit; the
//! periodic refresher; on-demand refetches (unknown `kid`, keys never fetched), rate-limited
//! and single-flight; and keeping the last good keys when a refresh fails.
//!
//! Must not touch: what a key set holds or how a signature is checked (`keys`), and tokens
//! or requests (`authn` asks this cache for keys, nothing more).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keys::{JwksError, KeySet};
use super::JwtError;
use crate::model::policy::{JwtRule, RequestAuthentication};

/// JWKS fetch timeout when a rule sets none (istiod's default).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often fetched key sets are refreshed (istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// The least time between two on-demand fetches of one key set (unknown `kid`, keys never
/// fetched), so a stream of forged `kid`s cannot turn weft into a load generator.
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Why a URI (`jwksUri`, a discovered `jwks_uri`) cannot be fetched from.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// Not a URI.
    #[error("{0}")]
    Invalid(#[from] http::uri::InvalidUri),
    /// A URI, but not an absolute `http://` or `https://` one.
    #[error("not an absolute http(s) URI")]
    NotAbsoluteHttp,
}

/// Why an issuer's OpenID configuration names no usable key set.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The document is not UTF-8.
    #[error("{0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    /// The document is not JSON.
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// It has no `jwks_uri`.
    #[error("no jwks_uri")]
    Missing,
    /// Its `jwks_uri` is not a string.
    #[error("jwks_uri is not a string: {value}")]
    NotAString {
        /// The `jwks_uri` found.
        value: Value,
    },
    /// Its `jwks_uri` is not an absolute http(s) URI.
    #[error("jwks_uri {uri:?}: {source}")]
    JwksUri {
        /// The `jwks_uri` found.
        uri: String,
        /// Why it cannot be fetched from.
        #[source]
        source: UriError,
    },
}

/// Why the extra CA file of the JWKS client cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// It cannot be read, or holds a malformed PEM section.
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// It holds no certificate.
    #[error("no certificate in the file")]
    NoCertificate,
}

// === impl JwksCache ===

/// Settings of the [`JwksCache`].
#[derive(Clone, Debug)]
pub struct JwksConfig {
    /// A PEM file of extra CA certificates trusted for `jwksUri` (besides the system roots).
    pub extra_ca_file: Option<PathBuf>,
    /// Trust the system's root certificates.
    pub system_roots: bool,
    /// How often fetched key sets are refreshed.
    pub refresh_interval: Duration,
    /// The least time between two on-demand fetches of one key set.
    pub min_refetch_interval: Duration,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            extra_ca_file: None,
            system_roots: true,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            min_refetch_interval: DEFAULT_MIN_REFETCH_INTERVAL,
        }
    }
}

/// Where a key set comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SourceKey {
    Inline(String),
    Remote(String),
    /// Found through the issuer's OpenID configuration (its URL).
    Discovered(String),
}

/// Where an issuer publishes its OpenID configuration (OpenID Connect Discovery 1.0 §4).
const OPENID_CONFIGURATION: &str = "/.well-known/openid-configuration";

/// One key set: inline (fixed) or remote (fetched, swapped on refresh).
pub(super) struct KeySource {
    remote: Option<Remote>,
    /// The current keys; `None` until a first fetch succeeds.
    keys: ArcSwapOption<KeySet>,
}

struct Remote {
    /// The key set's URI, or the OpenID configuration's when `discover`.
    uri: Uri,
    discover: bool,
    timeout: Duration,
    /// When the last fetch started; the lock also makes fetches of one set single-flight.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

/// Follows up to 10 redirects, as istiod's Go HTTP client does.
type HttpsClient = tower_http::follow_redirect::FollowRedirect<
    Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    tower_http::follow_redirect::policy::Limited,
>;

/// The issuers' public keys, shared by every [`JwtAuthenticator`] of the process.
///
/// Inline `jwks` are parsed once. A `jwksUri` is fetched on first use (or by the refresher),
/// refreshed every [`JwksConfig::refresh_interval`] by [`spawn_refresher`](Self::spawn_refresher),
/// and again on demand when a token names an unknown `kid`. A failed fetch keeps the last
/// good keys (and logs); an issuer whose keys were never fetched has no keys, so its tokens
/// are invalid.
pub struct JwksCache {
    client: HttpsClient,
    config: JwksConfig,
    sources: RwLock<HashMap<SourceKey, Arc<KeySource>>>,
    /// Wakes the refresher when a new remote source is registered.
    added: Notify,
    fetches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    /// Builds the cache and its HTTPS client. Reads the extra CA file (blocking: call at
    /// start-up).
    pub fn new(config: JwksConfig) -> Result<Self, JwtError> {
        let mut roots = rustls::RootCertStore::empty();
        if config.system_roots {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::warn!(error = %e, "JWKS client: loading system root certificates");
            }
            roots.add_parsable_certificates(native.certs);
        }
        if let Some(path) = &config.extra_ca_file {
            let ca_error = |source: CaFileError| JwtError::CaFile {
                path: path.clone(),
                source,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(CaFileError::Read(e)))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_error(CaFileError::Read(e)))?;
            if certs.is_empty() {
                return Err(ca_error(CaFileError::NoCertificate));
            }
            for cert in certs {
                roots.add(cert)?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = tower_http::follow_redirect::FollowRedirect::with_policy(
            Client::builder(TokioExecutor::new()).build(https),
            tower_http::follow_redirect::policy::Limited::new(10),
        );
        Ok(JwksCache {
            client,
            config,
            sources: RwLock::new(HashMap::new()),
            added: Notify::new(),
            fetches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Registers the key sets of `policies` and forgets those no policy names any more.
    /// Every bad policy is reported (named); the good ones are registered all the same.
    pub fn update(&self, policies: &[RequestAuthentication]) -> Result<(), Vec<JwtError>> {
        let mut errors = Vec::new();
        let mut wanted = HashSet::new();
        for p in policies {
            for rule in &p.spec.jwt_rules {
                match self.source_key(rule) {
                    Ok((key, _)) => {
                        if let Err(e) = self.source_for(rule) {
                            errors.push(e.in_policy(p));
                        } else {
                            wanted.insert(key);
                        }
                    }
                    Err(e) => errors.push(e.in_policy(p)),
                }
            }
        }
        // Authenticators hold their sources by Arc, so forgetting one here is safe.
        self.sources
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| wanted.contains(k));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// How many JWKS fetches were attempted (for metrics and tests).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Refreshes every remote key set now (each bounded by its timeout); failures keep the
    /// old keys.
    pub async fn refresh_all(&self) {
        for source in self.remotes() {
            self.refresh(&source, None).await;
        }
    }

    /// Fetches the remote key sets never tried yet.
    async fn refresh_new(&self) {
        for source in self.remotes() {
            let untried = source
                .remote
                .as_ref()
                .is_some_and(|r| r.last_attempt.try_lock().is_ok_and(|last| last.is_none()));
            if untried {
                self.refresh(&source, None).await;
            }
        }
    }

    fn remotes(&self) -> Vec<Arc<KeySource>> {
        self.sources
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|s| s.remote.is_some())
            .cloned()
            .collect()
    }

    /// Runs the periodic refresh until `shutdown`: every key set at once and then every
    /// [`JwksConfig::refresh_interval`]; a newly registered `jwksUri` as soon as it appears.
    pub fn spawn_refresher(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut next_full = Instant::now();
            loop {
                if Instant::now() >= next_full {
                    cache.refresh_all().await;
                    next_full = Instant::now() + cache.config.refresh_interval;
                } else {
                    cache.refresh_new().await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(next_full) => {}
                    _ = cache.added.notified() => {}
                }
            }
        })
    }

    /// The key source of a rule: `jwks` wins over `jwksUri`, as in Istio.
    fn source_key(&self, rule: &JwtRule) -> Result<(SourceKey, Option<Remote>), JwtError> {
        if let Some(jwks) = rule.jwks.as_deref().filter(|j| !j.trim().is_empty()) {
            return Ok((SourceKey::Inline(jwks.to_string()), None));
        }
        let timeout = match rule.timeout.as_deref().filter(|t| !t.is_empty()) {
            None => DEFAULT_FETCH_TIMEOUT,
            Some(t) => humantime::parse_duration(t).map_err(|source| JwtError::Timeout {
                issuer: rule.issuer.clone(),
                value: t.to_string(),
                source,
            })?,
        };
        let (key, uri, discover) = match rule.jwks_uri.as_deref().filter(|u| !u.is_empty()) {
            Some(uri) => {
                let parsed = http_uri(uri).map_err(|source| JwtError::JwksUri {
                    issuer: rule.issuer.clone(),
                    uri: uri.to_string(),
                    source,
                })?;
                if parsed.scheme_str() == Some("http") {
                    // istiod fetches plain http too; allowed, but the keys can then be
                    // forged in transit.
                    tracing::warn!(issuer = %rule.issuer, uri, "jwksUri is plain http");
                }
                (SourceKey::Remote(uri.to_string()), parsed, false)
            }
            None => {
                // One trailing slash dropped, as istiod's TrimSuffix does.
                let issuer = rule.issuer.strip_suffix('/').unwrap_or(&rule.issuer);
                let config = format!("{issuer}{OPENID_CONFIGURATION}");
                let parsed = http_uri(&config).map_err(|_| JwtError::NoJwksSource {
                    issuer: rule.issuer.clone(),
                })?;
                if parsed.scheme_str() == Some("http") {
                    tracing::warn!(issuer = %rule.issuer, "issuer is plain http: its key set is discovered over plain http");
                }
                (SourceKey::Discovered(config), parsed, true)
            }
        };
        Ok((
            key,
            Some(Remote {
                uri,
                discover,
                timeout,
                last_attempt: tokio::sync::Mutex::new(None),
            }),
        ))
    }

    /// The (shared) key source of a rule, registering it if new. Rules naming the same
    /// `jwksUri` share one source, fetched with the first rule's timeout.
    pub(super) fn source_for(&self, rule: &JwtRule) -> Result<Arc<KeySource>, JwtError> {
        let (key, remote) = self.source_key(rule)?;
        if let Some(s) = self
            .sources
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(s.clone());
        }
        let source = match (&key, remote) {
            (SourceKey::Inline(text), _) => {
                let keys = KeySet::parse(text).map_err(|source| JwtError::InlineJwks {
                    issuer: rule.issuer.clone(),
                    source,
                })?;
                KeySource {
                    remote: None,
                    keys: ArcSwapOption::from_pointee(keys),
                }
            }
            (SourceKey::Remote(_) | SourceKey::Discovered(_), remote) => KeySource {
                remote,
                keys: ArcSwapOption::empty(),
            },
        };
        let is_remote = source.remote.is_some();
        let source = self
            .sources
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| Arc::new(source))
            .clone();
        if is_remote {
            self.added.notify_one();
        }
        Ok(source)
    }

    /// The current keys of `source`. A remote source is fetched on demand (rate-limited)
    /// when it has no keys yet, or when `stale` is the set the caller found lacking.
    pub(super) async fn keys(
        &self,
        source: &KeySource,
        stale: Option<&Arc<KeySet>>,
    ) -> Option<Arc<KeySet>> {
        let current = source.keys.load_full();
        let wanted = match (&current, stale) {
            (None, _) => true,
            (Some(c), Some(s)) => Arc::ptr_eq(c, s),
            (Some(_), None) => false,
        };
        if wanted && source.remote.is_some() {
            self.refresh(source, Some(current.as_ref())).await;
            return source.keys.load_full();
        }
        current
    }

    /// Fetches a remote source and swaps its keys in. On demand (`seen` is the set the
    /// caller had), it is skipped when another fetch already replaced that set or when the
    /// last attempt is more recent than `min_refetch_interval`.
    async fn refresh(&self, source: &KeySource, seen: Option<Option<&Arc<KeySet>>>) {
        let Some(remote) = &source.remote else {
            return;
        };
        let mut last = remote.last_attempt.lock().await;
        if let Some(seen) = seen {
            let now_keys = source.keys.load_full();
            let replaced = match (now_keys.as_ref(), seen) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (Some(_), None) => true,
                _ => false,
            };
            let too_soon = last.is_some_and(|t| t.elapsed() < self.config.min_refetch_interval);
            if replaced || too_soon {
                return;
            }
        }
        *last = Some(Instant::now());
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.fetch_remote(remote).await {
            Ok(keys) => {
                tracing::debug!(uri = %remote.uri, keys = keys.key_count(), "JWKS fetched");
                source.keys.store(Some(Arc::new(keys)));
            }
            Err(e) => {
                let kept = source.keys.load().is_some();
                tracing::warn!(error = %e, kept_previous_keys = kept, "JWKS refresh failed");
            }
        }
    }

    /// The keys of `remote`: its key set, found first through the issuer's OpenID
    /// configuration when it is discovered.
    /// Both GETs of a discovery share the rule's timeout: a request waiting for keys waits
    /// no longer than for a `jwksUri`.
    async fn fetch_remote(&self, remote: &Remote) -> Result<KeySet, JwtError> {
        let deadline = Instant::now() + remote.timeout;
        let jwks_uri = if remote.discover {
            let config = remote.uri.to_string();
            let doc = self.get(&remote.uri, deadline, remote.timeout).await?;
            let uri = std::str::from_utf8(&doc)
                .map_err(DiscoveryError::from)
                .and_then(jwks_uri_of)
                .map_err(|source| JwtError::Discovery {
                    uri: config.clone(),
                    source,
                })?;
            if uri.scheme_str() == Some("http") {
                tracing::warn!(config, jwks_uri = %uri, "discovered jwksUri is plain http");
            }
            uri
        } else {
            remote.uri.clone()
        };
        let uri_s = jwks_uri.to_string();
        let doc = self.get(&jwks_uri, deadline, remote.timeout).await?;
        let text = std::str::from_utf8(&doc).map_err(|e| JwtError::FetchedJwks {
            uri: uri_s.clone(),
            source: JwksError::from(e),
        })?;
        KeySet::parse(text).map_err(|source| JwtError::FetchedJwks { uri: uri_s, source })
    }

    /// One GET of a JSON document, bounded by `deadline` (`timeout` is for the message) and
    /// [`MAX_JWKS_BYTES`].
    async fn get(
        &self,
        uri: &Uri,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Bytes, JwtError> {
        let uri_s = uri.to_string();
        let work = async {
            let req = http::Request::get(uri.clone())
                .header(http::header::ACCEPT, "application/json")
                .body(Empty::<Bytes>::new())
                .map_err(|e| JwtError::Fetch {
                    uri: uri_s.clone(),
                    source: Box::new(e),
                })?;
            let resp = tower::ServiceExt::oneshot(self.client.clone(), req)
                .await
                .map_err(|e| JwtError::Fetch {
                    uri: uri_s.clone(),
                    source: Box::new(e),
                })?;
            if !resp.status().is_success() {
                return Err(JwtError::FetchStatus {
                    uri: uri_s.clone(),
                    status: resp.status(),
                });
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| JwtError::Fetch {
                    uri: uri_s.clone(),
                    source: e,
                })?
                .to_bytes();
            Ok(body)
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| JwtError::FetchTimeout {
                uri: uri_s.clone(),
                timeout,
            })?
    }
}

/// `text` as an absolute http(s) URI, or why not.
fn http_uri(text: &str) -> Result<Uri, UriError> {
    let parsed = Uri::from_str(text)?;
    match parsed.scheme_str() {
        Some("https" | "http") if parsed.host().is_some() => Ok(parsed),
        _ => Err(UriError::NotAbsoluteHttp),
    }
}

/// The `jwks_uri` of an OpenID configuration document: a string holding an absolute
/// http(s) URI (istiod refuses any other value as well).
fn jwks_uri_of(doc: &str) -> Result<Uri, DiscoveryError> {
    let value: Value = serde_json::from_str(doc).map_err(DiscoveryError::NotJson)?;
    match value.get("jwks_uri") {
        Some(Value::String(uri)) => http_uri(uri).map_err(|source| DiscoveryError::JwksUri {
            uri: uri.clone(),
            source,
        }),
        Some(other) => Err(DiscoveryError::NotAString {
            value: other.clone(),
        }),
        None => Err(DiscoveryError::Missing),
    }
}

#[cfg(test)]
mod tests;
