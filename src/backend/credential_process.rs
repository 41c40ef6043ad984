//! S3 credentials from a `credential_process` command (a policy's `s3_credentials_command`,
//! `BACKUPD_S3_CREDENTIALS_COMMAND`), run by us rather than by aws-config.
//!
//! aws-config's own provider spawns a shell that inherits this process's whole environment,
//! repository password included. Here the command runs through `sh -c` with the secret
//! variables removed ([`crate::secret_env`]), and its output — the standard credential
//! document, `{"Version": 1, "AccessKeyId", "SecretAccessKey", "SessionToken"?,
//! "Expiration"?}` — is parsed by hand, so that no error message ever quotes it: errors
//! name the command and what is wrong, never a value the command printed.

use std::process::Stdio;
use std::time::SystemTime;

use aws_credential_types::provider::{self, error::CredentialsError, future};
use aws_credential_types::Credentials;
use zeroize::Zeroizing;

/// Why the credential command gave no credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialCommandError {
    /// `sh` could not be started.
    #[error("S3 credentials command {command:?} could not start: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited non-zero or by a signal.
    #[error("S3 credentials command {command:?} failed ({status})")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// What it printed is not a credential document we accept.
    #[error("S3 credentials command {command:?} printed no valid credentials: {why}")]
    BadOutput {
        /// The command.
        command: String,
        /// What is wrong (never a value from the output).
        why: String,
    },
}

impl CredentialCommandError {
    /// Whether running the command again may help: only a failing command (a vault that is
    /// briefly unreachable); a missing shell or a malformed document stays as it is.
    pub fn is_transient(&self) -> bool {
        matches!(self, CredentialCommandError::Failed { .. })
    }
}

/// A [`ProvideCredentials`](aws_credential_types::provider::ProvideCredentials) that runs
/// a `credential_process` command with a scrubbed environment.
#[derive(Clone)]
pub struct CredentialCommand {
    command: String,
}

impl std::fmt::Debug for CredentialCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCommand")
            .field("command", &self.command)
            .finish()
    }
}

/// The provider name the SDK records with the credentials.
const PROVIDER_NAME: &str = "backupd-credential-command";

impl CredentialCommand {
    /// A provider running `command` through `sh -c` each time credentials are needed.
    pub fn new(command: impl Into<String>) -> Self {
        CredentialCommand {
            command: command.into(),
        }
    }

    /// Runs the command and parses what it prints.
    ///
    /// # Errors
    /// The command cannot start, fails, or prints no valid credential document.
    pub async fn load(&self) -> Result<Credentials, CredentialCommandError> {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&self.command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        crate::secret_env::scrub_tokio(&mut cmd);
        let out = cmd
            .output()
            .await
            .map_err(|source| CredentialCommandError::Spawn {
                command: self.command.clone(),
                source,
            })?;
        let stdout = Zeroizing::new(out.stdout);
        if !out.status.success() {
            return Err(CredentialCommandError::Failed {
                command: self.command.clone(),
                status: out.status,
            });
        }
        parse_document(&stdout).map_err(|why| CredentialCommandError::BadOutput {
            command: self.command.clone(),
            why,
        })
    }
}

impl provider::ProvideCredentials for CredentialCommand {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.load()
                .await
                // Not boxed here: `provider_error` boxes it, and a second box would hide it
                // from the S3 backend's look for it among the causes.
                .map_err(CredentialsError::provider_error)
        })
    }
}

/// Takes a string field out of the document, wiped when dropped; `Err` names the field.
fn take_string(
    doc: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    required: bool,
) -> Result<Option<Zeroizing<String>>, String> {
    match doc.remove(key) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(Zeroizing::new(s))),
        Some(serde_json::Value::String(s)) => {
            drop(Zeroizing::new(s));
            Err(format!("{key} is empty"))
        }
        Some(serde_json::Value::Null) | None if !required => Ok(None),
        None | Some(serde_json::Value::Null) => Err(format!("no {key}")),
        Some(other) => {
            drop(Zeroizing::new(other.to_string()));
            Err(format!("{key} is not a string"))
        }
    }
}

/// Parses the credential document (AWS's `credential_process` format, version 1).
fn parse_document(out: &[u8]) -> Result<Credentials, String> {
    // serde_json's syntax errors give a position, never the text; type errors would quote
    // values, so the document is read as a generic value and checked by hand.
    let value: serde_json::Value = serde_json::from_slice(out).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => "not JSON (it ends early)".to_string(),
        _ => format!("not JSON (line {} column {})", e.line(), e.column()),
    })?;
    let serde_json::Value::Object(mut doc) = value else {
        return Err("not a JSON object".into());
    };
    match doc.get("Version") {
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => return Err("Version is not 1".into()),
        None => return Err("no Version".into()),
    }
    let access_key = take_string(&mut doc, "AccessKeyId", true)?;
    let secret_key = take_string(&mut doc, "SecretAccessKey", true)?;
    let token = take_string(&mut doc, "SessionToken", false)?;
    let expiry = match take_string(&mut doc, "Expiration", false)? {
        None => None,
        Some(t) => Some(SystemTime::from(
            chrono::DateTime::parse_from_rfc3339(&t)
                .map_err(|_| "Expiration is not an RFC 3339 time".to_string())?,
        )),
    };
    let (Some(access_key), Some(secret_key)) = (access_key, secret_key) else {
        return Err("no AccessKeyId or SecretAccessKey".into());
    };
    Ok(Credentials::new(
        access_key.as_str(),
        secret_key.as_str(),
        token.as_ref().map(|t| t.to_string()),
        expiry,
        PROVIDER_NAME,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_standard_document_and_hides_values_in_errors() {
        let c = parse_document(
            br#"{"Version": 1, "AccessKeyId": "AK", "SecretAccessKey": "SK",
                 "SessionToken": "TOK", "Expiration": "2030-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        assert_eq!(c.access_key_id(), "AK");
        assert_eq!(c.secret_access_key(), "SK");
        assert_eq!(c.session_token(), Some("TOK"));
        let when = chrono::DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z").unwrap();
        assert_eq!(c.expiry(), Some(SystemTime::from(when)));
        let c =
            parse_document(br#"{"Version":1,"AccessKeyId":"AK","SecretAccessKey":"SK"}"#).unwrap();
        assert_eq!((c.session_token(), c.expiry()), (None, None));

        for (doc, why) in [
            (&br#"hunter2"#[..], "not JSON"),
            (br#"{"Version": 1, "AccessKeyId": "AK", "SecretAccessKey": "hunter2""#, "not JSON"),
            (br#"["hunter2"]"#, "not a JSON object"),
            (br#"{"Version": 2, "AccessKeyId": "AK", "SecretAccessKey": "hunter2"}"#, "Version is not 1"),
            (br#"{"Version": "hunter2"}"#, "Version is not 1"),
            (br#"{"AccessKeyId": "AK", "SecretAccessKey": "hunter2"}"#, "no Version"),
            (br#"{"Version": 1, "SecretAccessKey": "hunter2"}"#, "no AccessKeyId"),
            (br#"{"Version": 1, "AccessKeyId": "hunter2"}"#, "no SecretAccessKey"),
            (br#"{"Version": 1, "AccessKeyId": "AK", "SecretAccessKey": ["hunter2"]}"#, "SecretAccessKey is not a string"),
            (br#"{"Version": 1, "AccessKeyId": "AK", "SecretAccessKey": "S", "Expiration": "hunter2"}"#, "Expiration is not an RFC 3339 time"),
        ] {
            let e = parse_document(doc).unwrap_err();
            assert!(e.starts_with(why), "{e:?} for {}", String::from_utf8_lossy(doc));
            assert!(!e.contains("hunter2"), "{e:?}");
        }
    }

    #[tokio::test]
    async fn a_failing_command_is_named_with_its_status() {
        let c = CredentialCommand::new(
            r#"printf '{"Version":1,"AccessKeyId":"AK","SecretAccessKey":"SK"}'"#,
        )
        .load()
        .await
        .unwrap();
        assert_eq!(c.access_key_id(), "AK");
        let e = CredentialCommand::new("exit 3 # named")
            .load()
            .await
            .unwrap_err();
        assert!(e.is_transient());
        assert!(e.to_string().contains("exit 3 # named"), "{e}");
        assert!(e.to_string().contains("exit status: 3"), "{e}");
        // The output is quoted nowhere (the command text itself does not hold it).
        let e = CredentialCommand::new("echo hun''ter2")
            .load()
            .await
            .unwrap_err();
        assert!(!e.is_transient());
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
