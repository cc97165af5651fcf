//! The JSON API under `/api/v1/`: machines, tasks, images, live sessions, and the agents'
//! reports. Reading is open on the lab's network; every write needs the admin token
//! (`Authorization: Bearer TOKEN`, see `bootserver token`); an agent's report needs its task's
//! token. Bad requests get a 4xx with `{"error": "..."}` naming the problem, and nothing of them
//! is stored.

use crate::lab::tasks::{check_label, TaskRequest};
use crate::lab::{parse_mac, same_secret, Lab, LabError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use diskcast_proto::report::{AgentReport, ReportStep, MAX_REPORT_BYTES};
use diskcast_registry::{Error as RegistryError, MachinePatch, Progress, Report, Step, TaskFilter};
use serde::Deserialize;
use std::sync::Arc;

/// What the API answers with when it refuses.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<LabError> for ApiError {
    fn from(e: LabError) -> Self {
        let status = match &e {
            LabError::Registry(r) => return registry_error(r),
            LabError::NoImage { .. } => StatusCode::NOT_FOUND,
            LabError::Store(s) => {
                return ApiError::new(StatusCode::CONFLICT, crate::web::public_reason(s))
            }
            LabError::OneMachineOnly { .. } | LabError::Invalid(_) => StatusCode::BAD_REQUEST,
            LabError::Token { .. } | LabError::Wake { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        log::debug!("api: {}", diskcast_proto::error_chain(&e));
        ApiError::new(status, e.to_string())
    }
}

fn registry_error(e: &RegistryError) -> ApiError {
    use RegistryError as E;
    let status = match e {
        E::NoSuchMachine { .. }
        | E::NoSuchTask { .. }
        | E::UnknownName { .. }
        | E::EmptyGroup { .. } => StatusCode::NOT_FOUND,
        E::Invalid { .. } | E::InvalidJson { .. } => StatusCode::BAD_REQUEST,
        E::NameTaken { .. }
        | E::MachineBusy { .. }
        | E::TaskOpen { .. }
        | E::IllegalTransition { .. }
        | E::AddressTaken { .. } => StatusCode::CONFLICT,
        _ => {
            log::error!("api: {}", diskcast_proto::error_chain(e));
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server's registry failed; its log says why",
            );
        }
    };
    ApiError::new(status, e.to_string())
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        registry_error(&e)
    }
}

type ApiResult = Result<Response, ApiError>;

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value)
        .map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))
}

/// Writes need the admin token.
fn admin(lab: &Lab, headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    let _ = lab;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(given) if same_secret(given, token) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the admin token is wrong (see `bootserver token`)",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "writes need the admin token: send `Authorization: Bearer TOKEN` (see `bootserver token`)",
        )),
    }
}

/// The API's state: the lab and the admin token.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub lab: Arc<Lab>,
    pub admin_token: Arc<str>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/machines", get(machines))
        .route(
            "/api/v1/machines/{mac}",
            get(machine).patch(patch_machine).delete(forget_machine),
        )
        .route("/api/v1/tasks", get(tasks).post(create_tasks))
        .route("/api/v1/tasks/{id}", get(task))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/api/v1/images", get(images))
        .route("/api/v1/sessions", get(sessions))
        .route(
            "/api/v1/agent/report",
            post(agent_report).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)),
        )
        .with_state(state)
}

async fn machines(State(s): State<ApiState>) -> ApiResult {
    Ok(Json(s.lab.registry.machines()?).into_response())
}

async fn machine(State(s): State<ApiState>, Path(mac): Path<String>) -> ApiResult {
    let mac = parse_mac(&mac)?;
    let machine = s
        .lab
        .registry
        .machine(mac)?
        .ok_or(RegistryError::NoSuchMachine { mac })?;
    let tasks = s.lab.registry.tasks(TaskFilter {
        mac: Some(mac),
        limit: Some(20),
        ..TaskFilter::default()
    })?;
    Ok(Json(serde_json::json!({ "machine": machine, "tasks": tasks })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineChange {
    #[serde(default, with = "optional_field")]
    name: Option<Option<String>>,
    #[serde(default, with = "optional_field")]
    group: Option<Option<String>>,
    #[serde(default, with = "optional_field")]
    local_boot: Option<Option<String>>,
    #[serde(default, with = "optional_field")]
    disk: Option<Option<String>>,
    #[serde(default)]
    known: Option<bool>,
}

/// `"field": null` clears it, a missing field leaves it alone.
mod optional_field {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

async fn patch_machine(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(mac): Path<String>,
    body: Result<Json<MachineChange>, JsonRejection>,
) -> ApiResult {
    admin(&s.lab, &headers, &s.admin_token)?;
    let mac = parse_mac(&mac)?;
    let change = json_body(body)?;
    for (what, value) in [("name", &change.name), ("group", &change.group)] {
        if let Some(Some(text)) = value {
            check_label(what, text.trim_start_matches('@'))?;
        }
    }
    if let Some(Some(method)) = &change.local_boot {
        if crate::config::LocalBoot::parse(method).is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "local_boot {method:?} is not {}",
                    crate::config::LocalBoot::EXPECTED
                ),
            ));
        }
    }
    if let Some(Some(disk)) = &change.disk {
        if diskcast_proto::cmdline::DiskSelector::parse(disk).is_none()
            || !disk.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "disk {disk:?} is not {}",
                    diskcast_proto::cmdline::DiskSelector::EXPECTED
                ),
            ));
        }
    }
    if s.lab.registry.machine(mac)?.is_none() {
        s.lab
            .registry
            .register(mac, None, None, crate::unix_now())?;
    }
    let machine = s.lab.registry.set(
        mac,
        MachinePatch {
            name: change.name,
            group: change.group,
            local_boot: change.local_boot,
            disk: change.disk,
            known: change.known,
        },
    )?;
    Ok(Json(machine).into_response())
}

async fn forget_machine(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(mac): Path<String>,
) -> ApiResult {
    admin(&s.lab, &headers, &s.admin_token)?;
    let mac = parse_mac(&mac)?;
    s.lab.registry.forget(mac)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
struct TaskQuery {
    #[serde(default)]
    all: bool,
}

async fn tasks(State(s): State<ApiState>, Query(query): Query<TaskQuery>) -> ApiResult {
    let tasks = s.lab.registry.tasks(TaskFilter {
        open_only: !query.all,
        limit: Some(500),
        ..TaskFilter::default()
    })?;
    Ok(Json(tasks).into_response())
}

async fn task(State(s): State<ApiState>, Path(id): Path<i64>) -> ApiResult {
    let task = s
        .lab
        .registry
        .task(id)?
        .ok_or(RegistryError::NoSuchTask { task: id })?;
    let events = s.lab.registry.events(id)?;
    Ok(Json(serde_json::json!({ "task": task, "events": events })).into_response())
}

async fn create_tasks(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<TaskRequest>, JsonRejection>,
) -> ApiResult {
    admin(&s.lab, &headers, &s.admin_token)?;
    let request = json_body(body)?;
    let lab = Arc::clone(&s.lab);
    // Creating tasks touches the registry and may send wake-up packets: off the async threads.
    let created =
        tokio::task::spawn_blocking(move || lab.create_tasks(&request, crate::unix_now()))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn cancel_task(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult {
    admin(&s.lab, &headers, &s.admin_token)?;
    let task = s.lab.registry.cancel(id, crate::unix_now())?;
    Ok(Json(task).into_response())
}

async fn images(State(s): State<ApiState>) -> ApiResult {
    let store = s.lab.store.clone();
    let listing = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                crate::web::public_reason(&e),
            )
        })?;
    let images: Vec<serde_json::Value> = listing
        .into_iter()
        .map(|entry| match entry {
            Ok(i) => serde_json::json!({
                "name": i.name, "disk_bytes": i.raw_size, "data_bytes": i.data_bytes,
                "stored_bytes": i.stored_bytes, "created": i.created,
                "hash": crate::web::short_hash(&i.image_hash), "origin": i.origin,
            }),
            Err(e) => serde_json::json!({ "error": crate::web::public_reason(&e) }),
        })
        .collect();
    Ok(Json(images).into_response())
}

async fn sessions(State(s): State<ApiState>) -> ApiResult {
    Ok(Json(s.lab.sessions.views()).into_response())
}

/// `POST /api/v1/agent/report`: an agent tells how its task goes, proving itself with the
/// token its kernel command line carried.
async fn agent_report(
    State(s): State<ApiState>,
    body: Result<Json<AgentReport>, JsonRejection>,
) -> ApiResult {
    let report = json_body(body)?;
    let lab = Arc::clone(&s.lab);
    tokio::task::spawn_blocking(move || record_report(&lab, report))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn record_report(lab: &Lab, report: AgentReport) -> Result<(), ApiError> {
    let refused = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the report's task and token do not match a task of this machine",
        )
    };
    let task = lab
        .registry
        .task_by_token(&report.token)?
        .ok_or_else(refused)?;
    if report.task != Some(task.id as u64) || report.mac != task.mac {
        return Err(refused());
    }
    let now = crate::unix_now();
    let step = match report.step {
        ReportStep::Booted { inventory } => {
            let json = serde_json::to_string(&inventory)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            lab.registry.record_inventory(task.mac, &json, now)?;
            Step::Booted
        }
        ReportStep::DiskChosen { disk } => Step::DiskChosen { disk },
        ReportStep::Joined => Step::Joined,
        ReportStep::Progress {
            percent,
            mb_per_s,
            repairs,
        } => Step::Progress(Progress {
            percent,
            mb_per_s,
            repairs,
        }),
        ReportStep::Verified => Step::Verified,
        ReportStep::Failed { reason } => Step::Failed { reason },
    };
    let what = format!("{step:?}");
    let task = lab.registry.report(task.id, Report { at: now, step })?;
    log::info!(
        "lab: task {} for {}: {} (now {})",
        task.id,
        task.mac,
        what.split([' ', '{', '(']).next().unwrap_or(&what),
        task.state
    );
    if let Some(reason) = &task.reason {
        log::warn!("lab: task {} failed: {reason}", task.id);
    }
    Ok(())
}
