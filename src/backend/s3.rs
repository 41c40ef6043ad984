//! S3 backend: objects under `BUCKET/PREFIX/` on AWS S3 or any S3-compatible store.
//!
//! The [`Backend`] trait is synchronous (the pipeline runs on threads); this backend owns a
//! small tokio runtime and every call runs as a task on it, the calling thread waiting for the
//! answer. Every HTTP request holds one permit of a semaphore, so at most `connections`
//! requests (whole objects, parts of one, list pages) are in flight at once: that bounds
//! both the sockets and the memory of parts.
//!
//! Objects up to `multipart_threshold` are one PUT; larger ones are multipart with parts
//! uploaded in parallel. Every upload carries its SHA-256 (`x-amz-checksum-sha256`) so the
//! store rejects bytes damaged on the way. Nothing here relies on conditional PUT: the
//! names are content hashes (the same name always means the same bytes), and the two names
//! that are not (`config`, key files named by their own hash too) are checked with HEAD.
//!
//! The SDK's own retries are off: [`crate::backend::layers::RetryLayer`] retries what
//! [`BackendError::is_transient`] calls transient, and the metrics layer counts each attempt.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, StorageClass};
use aws_sdk_s3::Client;
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::{Backend, BackendError, DirListing, ObjectType};

/// Why an S3 repository cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The `s3:` location does not parse.
    #[error("invalid S3 location {location:?}: {why} (expected s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX] or s3:BUCKET[/PREFIX])")]
    BadLocation {
        /// What was given.
        location: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `BACKUPD_S3_*` setting is invalid.
    #[error("{name}={value:?}: {why}")]
    BadSetting {
        /// Variable name.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// The I/O runtime could not start.
    #[error("starting the S3 client: {0}")]
    Runtime(std::io::Error),
    /// The shared-credentials file is missing, or others can read or write it.
    #[error(transparent)]
    CredentialsFile(#[from] crate::secret_file::SecretFileError),
}

/// Where a repository lives on S3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// `http(s)://host[:port]`, or `None` for AWS's own endpoints.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl S3Location {
    /// True when `location` names an S3 repository (`s3:...`) rather than a directory.
    pub fn is_s3(location: &str) -> bool {
        location.starts_with("s3:")
    }

    /// Parses `s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX]` or `s3:BUCKET[/PREFIX]`.
    ///
    /// # Errors
    /// `BadLocation` naming what is wrong.
    pub fn parse(location: &str) -> Result<Self, S3Error> {
        let bad = |why: &str| S3Error::BadLocation {
            location: location.to_string(),
            why: why.to_string(),
        };
        let rest = location
            .strip_prefix("s3:")
            .ok_or_else(|| bad("does not start with s3:"))?;
        let (endpoint, path) = if let Some(scheme_end) = rest.find("://") {
            let scheme = &rest[..scheme_end];
            if scheme != "http" && scheme != "https" {
                return Err(bad("the endpoint scheme must be http or https"));
            }
            let after = &rest[scheme_end + 3..];
            let (host, path) = after.split_once('/').unwrap_or((after, ""));
            if host.is_empty() {
                return Err(bad("no host"));
            }
            (Some(format!("{scheme}://{host}")), path)
        } else {
            (None, rest)
        };
        let path = path.trim_matches('/');
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(bad(
                "a bucket name is 3-63 characters of a-z, 0-9, '-' and '.'",
            ));
        }
        if prefix
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
            && !prefix.is_empty()
        {
            return Err(bad("the prefix has an empty, '.' or '..' component"));
        }
        Ok(S3Location {
            endpoint,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

/// Settings of the S3 client.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// Requests in flight at most (`--s3-connections`).
    pub connections: usize,
    /// Objects larger than this are uploaded as multipart.
    pub multipart_threshold: usize,
    /// Size of each part.
    pub part_size: usize,
    /// Endpoint override (`BACKUPD_S3_ENDPOINT`), e.g. for AWS-compatible stores when the
    /// location is `s3:BUCKET/PREFIX`.
    pub endpoint: Option<String>,
    /// Path-style addressing (`BACKUPD_S3_PATH_STYLE`); by default on for custom endpoints
    /// and off for AWS.
    pub path_style: Option<bool>,
    /// Storage class of new packs and WAL objects (`BACKUPD_S3_STORAGE_CLASS`); other
    /// objects stay in the bucket's default class.
    pub storage_class: Option<String>,
    /// Region override (`BACKUPD_S3_REGION`); otherwise the AWS chain, else `us-east-1`.
    pub region: Option<String>,
    /// Where credentials come from (a policy can name a file or a command).
    pub credentials: S3Credentials,
}

/// Where S3 credentials come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum S3Credentials {
    /// The standard AWS chain (AWS_* variables, shared profile, web identity, instance
    /// metadata).
    #[default]
    Chain,
    /// An AWS shared-credentials file and a profile in it.
    File {
        /// The file.
        path: std::path::PathBuf,
        /// The profile.
        profile: String,
    },
    /// A `credential_process` command printing the AWS JSON credential document, run
    /// without the secret variables ([`super::credential_process`]).
    Command(String),
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            connections: 16,
            multipart_threshold: 64 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
            endpoint: None,
            path_style: None,
            storage_class: None,
            region: None,
            credentials: S3Credentials::Chain,
        }
    }
}

impl S3Options {
    /// Applies the `BACKUPD_S3_*` variables found in `env`.
    ///
    /// # Errors
    /// `BadSetting` for a value that does not parse.
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Result<Self, S3Error> {
        if let Some(v) = env("BACKUPD_S3_ENDPOINT").filter(|v| !v.is_empty()) {
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(S3Error::BadSetting {
                    name: "BACKUPD_S3_ENDPOINT".into(),
                    value: v,
                    why: "expected http://HOST[:PORT] or https://HOST[:PORT]".into(),
                });
            }
            self.endpoint = Some(v.trim_end_matches('/').to_string());
        }
        if let Some(v) = env("BACKUPD_S3_PATH_STYLE").filter(|v| !v.is_empty()) {
            self.path_style = Some(match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(S3Error::BadSetting {
                        name: "BACKUPD_S3_PATH_STYLE".into(),
                        value: v,
                        why: "expected true or false".into(),
                    })
                }
            });
        }
        if let Some(v) = env("BACKUPD_S3_STORAGE_CLASS").filter(|v| !v.is_empty()) {
            let known = StorageClass::values();
            if !known.contains(&v.as_str()) {
                return Err(S3Error::BadSetting {
                    name: "BACKUPD_S3_STORAGE_CLASS".into(),
                    value: v,
                    why: format!("expected one of {}", known.join(", ")),
                });
            }
            self.storage_class = Some(v);
        }
        if let Some(v) = env("BACKUPD_S3_REGION").filter(|v| !v.is_empty()) {
            self.region = Some(v);
        }
        // A policy's credential source, handed on to child processes (a restored server's
        // restore_command): a shared-credentials file and profile, or a command.
        if let Some(v) = env("BACKUPD_S3_CREDENTIALS_FILE").filter(|v| !v.is_empty()) {
            self.credentials = S3Credentials::File {
                path: v.into(),
                profile: env("BACKUPD_S3_PROFILE")
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "default".into()),
            };
        } else if let Some(v) = env("BACKUPD_S3_CREDENTIALS_COMMAND").filter(|v| !v.is_empty()) {
            self.credentials = S3Credentials::Command(v);
        }
        Ok(self)
    }
}

/// A repository in an S3 bucket.
pub struct S3Backend {
    rt: tokio::runtime::Runtime,
    client: Client,
    loc: S3Location,
    display: String,
    permits: Arc<Semaphore>,
    opts: S3Options,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("location", &self.display)
            .finish_non_exhaustive()
    }
}

impl S3Backend {
    /// Connects (lazily: no request is made here). Credentials and region come from the
    /// standard AWS chain: environment, shared profile, web identity, instance metadata.
    ///
    /// # Errors
    /// The runtime cannot start; a shared-credentials file others can read or write.
    pub fn new(loc: S3Location, opts: S3Options) -> Result<Self, S3Error> {
        if let S3Credentials::File { path, .. } = &opts.credentials {
            // aws-config reads the file itself; its mode is ours to check.
            crate::secret_file::check(path, "S3 credentials file")?;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(S3Error::Runtime)?;
        let endpoint = opts.endpoint.clone().or_else(|| loc.endpoint.clone());
        let path_style = opts.path_style.unwrap_or(endpoint.is_some());
        let connections = opts.connections.max(1);
        let http = aws_smithy_http_client::Builder::new()
            .pool_max_idle_per_host(connections)
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        // A custom endpoint never needs instance metadata for its region: the override, the
        // AWS_REGION variables, or us-east-1 (which S3-compatible stores accept).
        let env_region = || {
            ["AWS_REGION", "AWS_DEFAULT_REGION"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        };
        let region = opts.region.clone().or_else(|| {
            endpoint
                .is_some()
                .then(|| env_region().unwrap_or_else(|| "us-east-1".into()))
        });
        let credentials = opts.credentials.clone();
        let client = rt.block_on(async move {
            let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
            if let Some(r) = region {
                loader = loader.region(Region::new(r));
            }
            match &credentials {
                S3Credentials::Chain => {}
                S3Credentials::File { path, profile } => {
                    use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
                    let files = EnvConfigFiles::builder()
                        .with_file(EnvConfigFileKind::Credentials, path)
                        .build();
                    loader = loader.profile_files(files).profile_name(profile);
                }
                S3Credentials::Command(cmd) => {
                    loader = loader.credentials_provider(
                        super::credential_process::CredentialCommand::new(cmd.clone()),
                    );
                }
            }
            let shared = loader.load().await;
            let mut b = aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(path_style)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
                .retry_config(RetryConfig::disabled())
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(10))
                        .read_timeout(Duration::from_secs(120))
                        .build(),
                );
            if let Some(ep) = &endpoint {
                b = b.endpoint_url(ep);
            }
            if shared.region().is_none() {
                b = b.region(Region::new("us-east-1"));
            }
            Client::from_conf(b.build())
        });
        let display = match (&opts.endpoint, &loc.endpoint) {
            (Some(ep), _) | (None, Some(ep)) => format!("s3:{ep}/{}", loc.bucket),
            (None, None) => format!("s3:{}", loc.bucket),
        } + &if loc.prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", loc.prefix)
        };
        Ok(S3Backend {
            rt,
            client,
            loc,
            display,
            permits: Arc::new(Semaphore::new(connections)),
            opts: S3Options {
                connections,
                part_size: opts.part_size.max(5 * 1024 * 1024),
                ..opts
            },
        })
    }

    fn key(&self, kind: ObjectType, name: &str) -> String {
        let rel = kind.path_of(name);
        if self.loc.prefix.is_empty() {
            rel
        } else {
            format!("{}/{rel}", self.loc.prefix)
        }
    }

    fn dir_prefix(&self, kind: ObjectType) -> String {
        if self.loc.prefix.is_empty() {
            format!("{}/", kind.dir())
        } else {
            format!("{}/{}/", self.loc.prefix, kind.dir())
        }
    }

    /// Runs a future on the backend's runtime and waits for it from this (non-async)
    /// thread. Works from any thread, including one inside another runtime's
    /// `spawn_blocking`.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv() {
            Ok(v) => v,
            // The task panicked; surface it on the caller's thread.
            Err(_) => panic!("S3 task ended without an answer"),
        }
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            client: self.client.clone(),
            bucket: self.loc.bucket.clone(),
            display: self.display.clone(),
            permits: self.permits.clone(),
        }
    }

    /// Creates the bucket when it does not exist yet (`init`).
    ///
    /// # Errors
    /// The store refuses.
    pub fn create_bucket(&self) -> Result<(), BackendError> {
        let ctx = self.ctx();
        let region = self.client.config().region().map(|r| r.to_string());
        self.run(async move {
            let _p = ctx.permit().await;
            match ctx.client.head_bucket().bucket(&ctx.bucket).send().await {
                Ok(_) => return Ok(()),
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(ctx.map_err("", e)),
            }
            let mut req = ctx.client.create_bucket().bucket(&ctx.bucket);
            if let Some(r) = region.filter(|r| r != "us-east-1") {
                req = req.create_bucket_configuration(
                    aws_sdk_s3::types::CreateBucketConfiguration::builder()
                        .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                            r.as_str(),
                        ))
                        .build(),
                );
            }
            match req.send().await {
                Ok(_) => Ok(()),
                Err(e)
                    if matches!(
                        e.code(),
                        Some("BucketAlreadyOwnedByYou") | Some("BucketAlreadyExists")
                    ) =>
                {
                    Ok(())
                }
                Err(e) => Err(ctx.map_err("", e)),
            }
        })
    }
}

/// What a request task needs, cloned into it.
#[derive(Clone)]
struct Ctx {
    client: Client,
    bucket: String,
    display: String,
    permits: Arc<Semaphore>,
}

fn status_of<E, R: HasStatus>(e: &SdkError<E, R>) -> Option<u16> {
    e.raw_response().map(HasStatus::status_code)
}

trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl Ctx {
    /// Every page of a listing under `prefix` (with `/` as delimiter when `folders`), each
    /// page one request holding one permit.
    async fn list_pages(
        &self,
        prefix: &str,
        folders: bool,
        mut each: impl FnMut(&ListObjectsV2Output),
    ) -> Result<(), BackendError> {
        let mut token: Option<String> = None;
        loop {
            let _p = self.permit().await;
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_delimiter(folders.then(|| "/".to_string()))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.map_err(prefix, e))?;
            each(&page);
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(()),
            }
        }
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        // The semaphore is never closed.
        self.permits
            .acquire()
            .await
            .unwrap_or_else(|_| unreachable!("the request semaphore is never closed"))
    }

    /// Maps an SDK error to a backend error naming the object and the endpoint.
    fn map_err<E>(
        &self,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> BackendError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let path = if key.is_empty() {
            self.display.clone()
        } else {
            format!("{}/{key}", self.display)
        };
        let status = status_of(&e);
        let code = e.code().map(str::to_string);
        let detail = e
            .message()
            .map(str::to_string)
            .unwrap_or_else(|| causes(&e).to_string());
        match (&e, status, code.as_deref()) {
            (_, _, Some("NoSuchBucket")) => BackendError::BucketMissing {
                location: self.display.clone(),
                bucket: self.bucket.clone(),
            },
            (_, Some(404), _) | (_, _, Some("NoSuchKey")) => BackendError::NotFound { path },
            (_, Some(401 | 403), _)
            | (_, _, Some("AccessDenied" | "SignatureDoesNotMatch" | "InvalidAccessKeyId")) => {
                BackendError::Denied {
                    location: self.display.clone(),
                    why: match code {
                        Some(c) => format!("{c}: {detail}"),
                        None => format!("HTTP {}", status.unwrap_or(403)),
                    },
                }
            }
            (SdkError::DispatchFailure(_), _, _) if credential_command_error(&e).is_some() => {
                BackendError::Remote {
                    path,
                    why: format!("no credentials: {}", causes(&e)),
                    transient: credential_command_error(&e).is_some_and(|c| c.is_transient()),
                }
            }
            (SdkError::DispatchFailure(d), _, _) => BackendError::Remote {
                path,
                why: format!("cannot reach the endpoint: {}", causes(&e)),
                transient: d.is_io() || d.is_timeout() || d.is_other(),
            },
            (SdkError::TimeoutError(_), _, _) => BackendError::Remote {
                path,
                why: "timed out".into(),
                transient: true,
            },
            (SdkError::ResponseError(_), _, _) => BackendError::Remote {
                path,
                why: format!("the response broke off: {}", causes(&e)),
                transient: true,
            },
            (SdkError::ConstructionFailure(_), _, _) => BackendError::Remote {
                path,
                why: format!("cannot build the request: {}", causes(&e)),
                transient: false,
            },
            (_, s, c) => {
                let transient = matches!(s, Some(500..=599 | 429 | 408))
                    || matches!(
                        c,
                        Some(
                            "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable"
                        )
                    );
                BackendError::Remote {
                    path,
                    why: match (s, c) {
                        (Some(s), Some(c)) => format!("HTTP {s} {c}: {detail}"),
                        (Some(s), None) => format!("HTTP {s}: {detail}"),
                        _ => detail,
                    },
                    transient,
                }
            }
        }
    }

    /// `BucketMissing` when the bucket does not exist.
    async fn check_bucket(&self) -> Result<(), BackendError> {
        let _p = self.permit().await;
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Err(e) if status_of(&e) == Some(404) => Err(BackendError::BucketMissing {
                location: self.display.clone(),
                bucket: self.bucket.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn body_err(&self, key: &str, e: impl std::fmt::Display) -> BackendError {
        BackendError::Remote {
            path: format!("{}/{key}", self.display),
            why: format!("the response broke off: {e}"),
            transient: true,
        }
    }

    async fn put_single(
        &self,
        key: String,
        data: Bytes,
        sum: String,
        storage_class: Option<StorageClass>,
    ) -> Result<(), BackendError> {
        let _p = self.permit().await;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_length(data.len() as i64)
            .checksum_sha256(sum)
            .body(ByteStream::from(data));
        if let Some(sc) = storage_class {
            req = req.storage_class(sc);
        }
        // The checksum header already protects the body; signing it too would hash every
        // byte a second time.
        req.customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.map_err(&key, e))?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        key: String,
        data: Bytes,
        part_size: usize,
        storage_class: Option<StorageClass>,
    ) -> Result<(), BackendError> {
        let upload_id = {
            let _p = self.permit().await;
            let mut req = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .checksum_algorithm(ChecksumAlgorithm::Sha256);
            if let Some(sc) = storage_class {
                req = req.storage_class(sc);
            }
            let out = req.send().await.map_err(|e| self.map_err(&key, e))?;
            out.upload_id()
                .map(str::to_string)
                .ok_or_else(|| BackendError::Remote {
                    path: format!("{}/{key}", self.display),
                    why: "the store returned no upload id".into(),
                    transient: false,
                })?
        };
        let result = match self.upload_parts(&key, &upload_id, &data, part_size).await {
            Ok(parts) => {
                let _p = self.permit().await;
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.map_err(&key, e))
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Best effort: a store keeps (and bills) the parts of an upload never finished.
            let _p = self.permit().await;
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    /// Uploads all parts, as many at once as there are free permits.
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        data: &Bytes,
        part_size: usize,
    ) -> Result<Vec<CompletedPart>, BackendError> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, start) in (0..data.len()).step_by(part_size).enumerate() {
            let part = data.slice(start..(start + part_size).min(data.len()));
            let number = i32::try_from(i + 1).unwrap_or(i32::MAX);
            let ctx = self.clone();
            let key = key.to_string();
            let upload_id = upload_id.to_string();
            tasks.spawn(async move {
                let sum = b64_sha256(&part);
                let _p = ctx.permit().await;
                let out = ctx
                    .client
                    .upload_part()
                    .bucket(&ctx.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .content_length(part.len() as i64)
                    .checksum_sha256(sum.clone())
                    .body(ByteStream::from(part))
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|e| ctx.map_err(&key, e))?;
                Ok::<_, BackendError>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .checksum_sha256(sum)
                        .build(),
                )
            });
        }
        let mut parts = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(p)) => parts.push(p),
                Ok(Err(e)) => {
                    tasks.abort_all();
                    return Err(e);
                }
                Err(e) => {
                    tasks.abort_all();
                    return Err(BackendError::Remote {
                        path: format!("{}/{key}", self.display),
                        why: format!("a part upload failed: {e}"),
                        transient: false,
                    });
                }
            }
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    /// Reads into `buf` (cleared; its allocation reused) and hands it back.
    async fn get_into(
        &self,
        key: String,
        range: Option<(u64, u64)>,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, BackendError> {
        let _p = self.permit().await;
        let mut req = self.client.get_object().bucket(&self.bucket).key(&key);
        if let Some((off, len)) = range {
            req = req.range(format!("bytes={off}-{}", off + len - 1));
        }
        let out = match req.send().await {
            Ok(o) => o,
            Err(e) if status_of(&e) == Some(416) => {
                let (offset, want) = range.unwrap_or((0, 0));
                return Err(BackendError::ShortRead {
                    path: format!("{}/{key}", self.display),
                    offset,
                    want,
                    got: 0,
                });
            }
            Err(e) => return Err(self.map_err(&key, e)),
        };
        let announced = out.content_length().and_then(|n| u64::try_from(n).ok());
        let mut body = out.body;
        let want = range.map(|(_, len)| len);
        match read_body(&mut body, announced, want, &mut buf).await {
            Ok(()) => {}
            Err(BodyError::Broke(why)) => return Err(self.body_err(&key, why)),
            Err(BodyError::TooLong(why)) => {
                return Err(BackendError::Remote {
                    path: format!("{}/{key}", self.display),
                    why,
                    transient: false,
                })
            }
        }
        if let Some((offset, want)) = range {
            if (buf.len() as u64) < want {
                return Err(BackendError::ShortRead {
                    path: format!("{}/{key}", self.display),
                    offset,
                    want,
                    got: buf.len() as u64,
                });
            }
        }
        Ok(buf)
    }
}

/// The credential command's error somewhere in the causes of `e`, if that is what failed.
fn credential_command_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a super::credential_process::CredentialCommandError> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(found) = c.downcast_ref::<super::credential_process::CredentialCommandError>() {
            return Some(found);
        }
        cur = c.source();
    }
    None
}

/// At most this much is reserved up front for a whole-object GET, whatever the server
/// announces; more grows with the bytes that arrive.
const FULL_GET_RESERVE: usize = 8 * 1024 * 1024;

/// A response body, chunk by chunk: the SDK's stream, or a crafted one in tests.
trait BodyChunks {
    /// The next chunk; `None` at the end.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String>;
}

impl BodyChunks for ByteStream {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.try_next().await.map_err(|e| e.to_string())
    }
}

/// Why a body was not read (made a [`BackendError`] naming the object by the caller).
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// It broke off, or fewer bytes came than announced (worth a retry).
    #[error("{0}")]
    Broke(String),
    /// More bytes came than announced or asked for.
    #[error("{0}")]
    TooLong(String),
}

/// Reads a GET's body into `buf` (cleared; its allocation reused). `announced` is the
/// response's Content-Length, `want` the length of the range asked for.
///
/// Both are only claims until the bytes arrive: what is reserved up front is at most the
/// range asked for (and the announced length only when smaller), or [`FULL_GET_RESERVE`]
/// for a whole object, so a server announcing a petabyte costs nothing. Reading stops with
/// an error at the first chunk that would go past the range or the announced length: a
/// server that keeps sending cannot make us read or hold more than we asked for.
async fn read_body(
    body: &mut impl BodyChunks,
    announced: Option<u64>,
    want: Option<u64>,
    buf: &mut Vec<u8>,
) -> Result<(), BodyError> {
    let limit = match (want, announced) {
        (Some(w), Some(a)) => Some(w.min(a)),
        (w, a) => w.or(a),
    };
    let reserve = match want {
        Some(_) => limit.unwrap_or(0),
        None => limit.unwrap_or(0).min(FULL_GET_RESERVE as u64),
    };
    buf.clear();
    buf.reserve(usize::try_from(reserve).unwrap_or(0));
    while let Some(chunk) = body.next_chunk().await.map_err(BodyError::Broke)? {
        let total = buf.len() as u64 + chunk.len() as u64;
        if let Some(limit) = limit.filter(|&l| total > l) {
            return Err(BodyError::TooLong(match want {
                Some(w) if w == limit => {
                    format!("the server sent more than the {w} bytes asked for")
                }
                _ => format!("the server sent more than the {limit} bytes announced"),
            }));
        }
        buf.extend_from_slice(&chunk);
    }
    if let Some(n) = announced {
        if buf.len() as u64 != n {
            return Err(BodyError::Broke(format!(
                "{} of {n} announced bytes arrived",
                buf.len()
            )));
        }
    }
    Ok(())
}

/// An error and its sources, each said once ("dispatch failure: io error: ... Connection
/// refused (os error 111)").
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// A 64-digit hex name as 32 bytes.
fn hex_sha256(name: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(name, &mut out).ok()?;
    Some(out)
}

fn b64_sha256(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.display.clone()
    }

    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        let key = self.key(kind, name);
        let ctx = self.ctx();
        // Only bulk data takes the storage class: metadata is small and read often, and
        // locks and marks live minutes (infrequent-access classes bill 30 days minimum).
        let sc = matches!(kind, ObjectType::Pack | ObjectType::Wal)
            .then(|| self.opts.storage_class.as_deref().map(StorageClass::from))
            .flatten();
        let part_size = self.opts.part_size;
        if data.len() > self.opts.multipart_threshold {
            self.run(async move { ctx.put_multipart(key, data, part_size, sc).await })
        } else {
            // Every name but `config` is the SHA-256 of the object's bytes (format.md), so
            // the checksum the store verifies is the name itself: no second pass over the
            // data, and a name that does not match its bytes is refused (BadDigest).
            let sum = match hex_sha256(name) {
                Some(d) if kind.named_by_content() => {
                    base64::engine::general_purpose::STANDARD.encode(d)
                }
                _ => b64_sha256(&data),
            };
            self.run(async move { ctx.put_single(key, data, sum, sc).await })
        }
    }

    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        // A PUT replaces an object atomically: readers see the old or the new bytes (on a
        // versioned or Object Lock bucket, as a new version).
        let key = self.key(kind, name);
        let ctx = self.ctx();
        let sum = b64_sha256(&data);
        self.run(async move { ctx.put_single(key, data, sum, None).await })
    }

    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError> {
        let key = self.key(kind, name);
        let ctx = self.ctx();
        let is_config = kind == ObjectType::Config;
        self.run(async move {
            match ctx.get_into(key, None, Vec::new()).await {
                Err(BackendError::NotFound { path }) if is_config => {
                    // Some stores answer NoSuchKey for a missing bucket too: ask, to say
                    // which is missing.
                    ctx.check_bucket().await?;
                    Err(BackendError::NotFound { path })
                }
                other => other,
            }
        })
    }

    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        if len == 0 {
            buf.clear();
            return Ok(());
        }
        let key = self.key(kind, name);
        let ctx = self.ctx();
        let owned = std::mem::take(buf);
        *buf = self.run(async move { ctx.get_into(key, Some((offset, len)), owned).await })?;
        Ok(())
    }

    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
        let prefix = self.dir_prefix(kind);
        let ctx = self.ctx();
        self.run(async move {
            let mut out = Vec::new();
            ctx.list_pages(&prefix, false, |page| {
                for o in page.contents() {
                    let Some(key) = o.key() else { continue };
                    let name = key.rsplit('/').next().unwrap_or(key);
                    if name.is_empty() || name.starts_with('.') {
                        continue;
                    }
                    out.push((name.to_string(), o.size().unwrap_or(0).max(0) as u64));
                }
            })
            .await?;
            Ok(out)
        })
    }

    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
        let mut prefix = self.dir_prefix(kind);
        if !sub.is_empty() {
            prefix.push_str(sub.trim_end_matches('/'));
            prefix.push('/');
        }
        let ctx = self.ctx();
        self.run(async move {
            let mut out = DirListing::default();
            ctx.list_pages(&prefix, true, |page| {
                for o in page.contents() {
                    let Some(name) = o.key().and_then(|k| k.strip_prefix(prefix.as_str())) else {
                        continue;
                    };
                    if name.is_empty() || name.starts_with('.') {
                        continue;
                    }
                    out.files
                        .push((name.to_string(), o.size().unwrap_or(0).max(0) as u64));
                }
                for p in page.common_prefixes() {
                    if let Some(d) = p
                        .prefix()
                        .and_then(|k| k.strip_prefix(prefix.as_str()))
                        .map(|d| d.trim_end_matches('/'))
                        .filter(|d| !d.is_empty())
                    {
                        out.dirs.push(d.to_string());
                    }
                }
            })
            .await?;
            out.files.sort();
            out.dirs.sort();
            Ok(out)
        })
    }

    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError> {
        let key = self.key(kind, name);
        let ctx = self.ctx();
        self.run(async move {
            let _p = ctx.permit().await;
            ctx.client
                .delete_object()
                .bucket(&ctx.bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| ctx.map_err(&key, e))?;
            Ok(())
        })
    }

    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        let key = self.key(kind, name);
        let ctx = self.ctx();
        self.run(async move {
            let head = {
                let _p = ctx.permit().await;
                ctx.client
                    .head_object()
                    .bucket(&ctx.bucket)
                    .key(&key)
                    .send()
                    .await
            };
            match head {
                // The store's clock (one-second resolution), not this host's.
                Ok(h) => Ok(h
                    .last_modified()
                    .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos()))),
                // A 404 maps to NotFound.
                Err(e) => Err(ctx.map_err(&key, e)),
            }
        })
    }

    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError> {
        let key = self.key(kind, name);
        let ctx = self.ctx();
        let is_config = kind == ObjectType::Config;
        self.run(async move {
            let head = {
                let _p = ctx.permit().await;
                ctx.client
                    .head_object()
                    .bucket(&ctx.bucket)
                    .key(&key)
                    .send()
                    .await
            };
            match head {
                Ok(_) => Ok(true),
                Err(e) if status_of(&e) == Some(404) => {
                    if is_config {
                        // A HEAD answer has no body, so a missing bucket looks like a
                        // missing object: ask once, to say which.
                        ctx.check_bucket().await?;
                    }
                    Ok(false)
                }
                Err(e) => Err(ctx.map_err(&key, e)),
            }
        })
    }

    fn create(&self) -> Result<(), BackendError> {
        self.create_bucket()
    }

    fn connections(&self) -> Option<usize> {
        Some(self.opts.connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crafted body: these chunks, then (if `repeat`) the last one again `repeat` times;
    /// counts the chunks taken.
    struct Crafted {
        chunks: std::collections::VecDeque<Bytes>,
        repeat: usize,
        taken: usize,
    }

    impl Crafted {
        fn new(chunks: &[&[u8]], repeat: usize) -> Self {
            Crafted {
                chunks: chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect(),
                repeat,
                taken: 0,
            }
        }
    }

    impl BodyChunks for Crafted {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
            let next = if self.chunks.len() == 1 && self.repeat > 0 {
                self.repeat -= 1;
                self.chunks.front().cloned()
            } else {
                self.chunks.pop_front()
            };
            self.taken += usize::from(next.is_some());
            Ok(next)
        }
    }

    fn read(
        body: &mut Crafted,
        announced: Option<u64>,
        want: Option<u64>,
    ) -> (Result<(), BodyError>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut buf = Vec::new();
        let r = rt.block_on(read_body(body, announced, want, &mut buf));
        (r, buf)
    }

    #[test]
    fn an_announced_length_reserves_no_more_than_was_asked_for() {
        // A server announcing a petabyte for a 10-byte range: nothing like it is reserved
        // (reserving it would abort the process), and the 10 bytes are read.
        let mut body = Crafted::new(&[b"0123456789"], 0);
        let (r, buf) = read(&mut body, Some(1 << 50), Some(10));
        assert!(
            matches!(r, Err(BodyError::Broke(ref why)) if why.contains("announced")),
            "{r:?}"
        );
        assert!(buf.capacity() < 1 << 20, "{}", buf.capacity());
        // A whole-object GET announcing a petabyte reserves a bounded amount, and fails
        // when the bytes stop short of it.
        let mut body = Crafted::new(&[b"abc", b"def"], 0);
        let (r, buf) = read(&mut body, Some(1 << 50), None);
        assert!(matches!(r, Err(BodyError::Broke(_))), "{r:?}");
        assert!(buf.capacity() <= FULL_GET_RESERVE, "{}", buf.capacity());
        // Honest answers still read whole.
        let mut body = Crafted::new(&[b"abc", b"def"], 0);
        let (r, buf) = read(&mut body, Some(6), None);
        r.unwrap();
        assert_eq!(buf, b"abcdef");
        let mut body = Crafted::new(&[b"abc", b"def"], 0);
        let (r, buf) = read(&mut body, None, Some(6));
        r.unwrap();
        assert_eq!(buf, b"abcdef");
    }

    #[test]
    fn reading_stops_at_the_requested_length() {
        // A server that keeps sending after the 10 bytes asked for (64 MiB here): reading
        // stops at the first chunk past them, with an error.
        let chunk = vec![7u8; 64 * 1024];
        for announced in [None, Some(64 << 20)] {
            let mut body = Crafted::new(&[b"0123456789", &chunk], 1023);
            let (r, buf) = read(&mut body, announced, Some(10));
            assert!(
                matches!(r, Err(BodyError::TooLong(ref why)) if why.contains("10 bytes asked for")),
                "{r:?}"
            );
            assert_eq!(body.taken, 2, "chunks read past the range");
            assert!(buf.capacity() < 1 << 20, "{}", buf.capacity());
        }
        // A whole-object GET stops past the announced length.
        let mut body = Crafted::new(&[b"0123456789", &chunk], 1023);
        let (r, _) = read(&mut body, Some(10), None);
        assert!(
            matches!(r, Err(BodyError::TooLong(ref why)) if why.contains("10 bytes announced")),
            "{r:?}"
        );
        assert_eq!(body.taken, 2);
    }

    #[test]
    fn parses_custom_endpoints_and_aws_locations() {
        let l = S3Location::parse("s3:http://127.0.0.1:9000/bk1/some/prefix/").unwrap();
        assert_eq!(l.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(l.bucket, "bk1");
        assert_eq!(l.prefix, "some/prefix");
        let l = S3Location::parse("s3:https://s3.example.com/bucket").unwrap();
        assert_eq!(l.endpoint.as_deref(), Some("https://s3.example.com"));
        assert_eq!(l.prefix, "");
        let l = S3Location::parse("s3:my-bucket/host1").unwrap();
        assert_eq!(l.endpoint, None);
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("my-bucket", "host1")
        );
    }

    #[test]
    fn rejects_malformed_locations() {
        for bad in [
            "s3:",
            "s3:http://",
            "s3:http://host",
            "s3:ftp://host/bucket",
            "s3:BUCKET",
            "s3:ab",
            "s3:bucket/a//b",
            "s3:bucket/../x",
            "/local/path",
        ] {
            let e = S3Location::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn env_overrides_are_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = S3Options::default()
            .with_env(env(&[
                ("BACKUPD_S3_ENDPOINT", "http://127.0.0.1:1/"),
                ("BACKUPD_S3_PATH_STYLE", "false"),
                ("BACKUPD_S3_STORAGE_CLASS", "STANDARD_IA"),
            ]))
            .unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(o.path_style, Some(false));
        assert_eq!(o.storage_class.as_deref(), Some("STANDARD_IA"));
        for (k, v) in [
            ("BACKUPD_S3_ENDPOINT", "127.0.0.1:9000"),
            ("BACKUPD_S3_PATH_STYLE", "maybe"),
            ("BACKUPD_S3_STORAGE_CLASS", "COLD"),
        ] {
            let e = S3Options::default()
                .with_env(|n| (n == k).then(|| v.to_string()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(k) && e.contains(v), "{e}");
        }
    }
}
