//! API errors: every refusal is JSON `{"error": "...", "detail": ...}`.

use crate::views::{ErrorBody, ErrorDetail};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::consensus::ConsensusError;
use crate::model::InvalidField;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(#[from] InvalidField),
    #[error("{message}")]
    BadRequest { message: String, status: StatusCode },
    #[error("missing or wrong token: {0}")]
    Unauthorized(&'static str),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("too many failed authentications from this address; retry in {retry_after_s} s")]
    TooManyRequests { retry_after_s: u64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Consensus(#[from] ConsensusError),
    /// The leader could not hand leadership over (no fit successor, the VIP
    /// release failed): not a missing leader or quorum.
    #[error("{0}")]
    Failover(String),
    /// A follower could not get an answer from the leader it forwarded an
    /// operator request to: it may or may not have been carried out.
    #[error("{0}")]
    Forward(String),
    /// This node failed at something of its own (reading its audit log).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::BadRequest { status, .. } => *status,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Consensus(ConsensusError::Rejected(_)) => StatusCode::CONFLICT,
            ApiError::Consensus(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Failover(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Forward(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn detail(&self) -> Option<ErrorDetail> {
        let situation = |retryable, situation: &str| ErrorDetail::Situation {
            retryable,
            situation: situation.into(),
        };
        Some(match self {
            ApiError::Invalid(f) => ErrorDetail::Field {
                field: f.field.into(),
                reason: f.reason.clone(),
            },
            ApiError::Consensus(ConsensusError::Unavailable(_)) => {
                situation(true, "no leader reachable with a quorum")
            }
            ApiError::Consensus(ConsensusError::Unknown(_)) => situation(
                false,
                "the leader went away mid-write; the write may or may not have been applied",
            ),
            ApiError::Failover(_) => situation(
                true,
                "the leader could not hand leadership over; it still leads",
            ),
            ApiError::Forward(_) => situation(
                false,
                "the leader did not answer this node; it may have done it: check clb status before trying again",
            ),
            ApiError::Internal(_) => situation(
                true,
                "this node failed to read its own data; another node may answer",
            ),
            _ => return None,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(ErrorBody {
            error: self.to_string(),
            detail: self.detail(),
        });
        if status == StatusCode::UNAUTHORIZED {
            return (
                status,
                [(header::WWW_AUTHENTICATE, "Bearer".to_string())],
                body,
            )
                .into_response();
        }
        if let ApiError::TooManyRequests { retry_after_s } = &self {
            return (
                status,
                [(header::RETRY_AFTER, retry_after_s.to_string())],
                body,
            )
                .into_response();
        }
        (status, body).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("body larger than {} bytes", super::BODY_LIMIT)
        } else {
            format!("invalid JSON body: {}", r.body_text())
        };
        ApiError::BadRequest { message, status }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest {
            message: format!("invalid path: {}", r.body_text()),
            status: StatusCode::BAD_REQUEST,
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest {
            message: format!("invalid query: {}", r.body_text()),
            status: StatusCode::BAD_REQUEST,
        }
    }
}
