//! Error types of the crate: parse/validation errors that name the input (source, document,
//! resource, field path), label and selector errors, identity allocation errors.
//!
//! Messages follow Cilium's wording where Cilium has one (reference §1.2–1.4), so users can
//! search for them.

use std::fmt;

/// A policy document could not be parsed or failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not valid YAML/JSON.
    #[error("{source_name}: {message}")]
    Syntax {
        /// Name of the input (file name, `<stdin>`, …) as given by the caller.
        source_name: String,
        /// The parser's message (with line/column where known).
        message: String,
    },
    /// A document is well-formed but not a valid policy.
    #[error("{source_name}: document {document}{resource}: {path}: {message}")]
    Invalid {
        /// Name of the input as given by the caller.
        source_name: String,
        /// Index of the document in the input (0-based; `kind: List` items count as their own).
        document: usize,
        /// ` (Kind namespace/name)` when known, else empty.
        resource: String,
        /// Field path inside the document (`specs[1].egress[0].toPorts[0].rules.kafka`).
        path: String,
        /// What is wrong and, where possible, how to fix it.
        message: String,
    },
}

impl PolicyError {
    /// The field path of an [`PolicyError::Invalid`] error.
    pub fn path(&self) -> Option<&str> {
        match self {
            PolicyError::Invalid { path, .. } => Some(path),
            PolicyError::Syntax { .. } => None,
        }
    }

    /// The bare message (without source, document and path).
    pub fn message(&self) -> &str {
        match self {
            PolicyError::Invalid { message, .. } | PolicyError::Syntax { message, .. } => message,
        }
    }
}

/// A field-level error before document context is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A label string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label `{input}`: {message}")]
pub struct LabelError {
    /// The text that was parsed.
    pub input: String,
    /// Why it is invalid.
    pub message: String,
}

impl LabelError {
    pub(crate) fn new(input: &str, message: &str) -> LabelError {
        LabelError {
            input: input.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// A selector is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A key did not parse as `[source:]key`.
    #[error(transparent)]
    Label(#[from] LabelError),
    /// An operator is not one of In, NotIn, Exists, DoesNotExist.
    #[error("unknown matchExpressions operator `{0}` (expected In, NotIn, Exists or DoesNotExist)")]
    Operator(String),
    /// `In`/`NotIn` without values, or `Exists`/`DoesNotExist` with values.
    #[error("operator {op} on key `{key}` {problem}")]
    Values {
        /// The operator.
        op: String,
        /// The key.
        key: String,
        /// `requires at least one value` / `takes no values`.
        problem: &'static str,
    },
}

/// Identity allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The scope's numeric range is used up.
    #[error("no free {scope} identity left (range {first}..={last})")]
    Exhausted {
        /// `cluster` or `local`.
        scope: &'static str,
        /// First id of the range.
        first: u32,
        /// Last id of the range.
        last: u32,
    },
    /// The empty label set has no identity.
    #[error("cannot allocate an identity for an empty label set")]
    EmptyLabels,
}
