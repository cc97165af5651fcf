//! The JSON API under `/api/v1/`: machines, tasks, images, live sessions, and the agents'
//! reports. Reading is open on the lab's network; every write needs the admin token
//! (`Authorization: Bearer TOKEN`, see `bootserver token`); an agent's report needs its task's
//! token. Bad requests get a 4xx with `{"error": "..."}` naming the problem, and nothing of them
//! is stored.

use crate::lab::checks::CheckState;
use crate::lab::tasks::{check_label, TaskRequest};
use crate::lab::{parse_mac, Lab, LabError};
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
            LabError::Token { .. } | LabError::Wake { .. } | LabError::Key(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
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

/// Writes need the admin token (or the web console's login, see `console::login`).
fn admin(lab: &Lab, headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    crate::console::login::check(lab, headers, token, crate::console::login::Intent::Write)
        .map_err(|why| ApiError::new(StatusCode::UNAUTHORIZED, why))
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
        .route("/api/v1/images/{name}/verify", post(verify_image))
        .route("/api/v1/wake", post(wake))
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
                "name": i.name, "disk_bytes": i.raw_size, "used_bytes": i.used_bytes,
                "data_bytes": i.data_bytes,
                "stored_bytes": i.stored_bytes, "created": i.created,
                "hash": crate::web::short_hash(&i.image_hash), "origin": i.origin,
                "check": s.lab.image_checks.get(&i.name, &i.image_hash),
            }),
            Err(e) => serde_json::json!({ "error": crate::web::public_reason(&e) }),
        })
        .collect();
    Ok(Json(images).into_response())
}

/// `POST /api/v1/images/NAME/verify`: decompresses and hashes every chunk of a stored image
/// again, in the background (a large image takes minutes); `GET /api/v1/images` shows the
/// result as its `check`.
async fn verify_image(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    admin(&s.lab, &headers, &s.admin_token)?;
    let store = s.lab.store.clone();
    let opened = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || store.show(&name).map(|(summary, _)| summary))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    };
    let summary = opened.map_err(|e| {
        let status = match e {
            crate::store::StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            crate::store::StoreError::Name(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::CONFLICT,
        };
        ApiError::new(status, crate::web::public_reason(&e))
    })?;
    let hash = summary.image_hash;
    if !s.lab.image_checks.start(&name, hash, crate::unix_now()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("image {name:?} is being verified already"),
        ));
    }
    log::info!("store: verifying image {name:?} (asked through the API)");
    let lab = Arc::clone(&s.lab);
    tokio::task::spawn_blocking(move || {
        let state = match lab.store.verify(&name) {
            Ok(_) => {
                log::info!("store: image {name:?} verified");
                CheckState::Verified {
                    at: crate::unix_now(),
                }
            }
            Err(e) => {
                log::warn!(
                    "store: image {name:?} failed its check: {}",
                    diskcast_proto::error_chain(&e)
                );
                CheckState::Failed {
                    at: crate::unix_now(),
                    reason: crate::web::public_reason(&e),
                }
            }
        };
        lab.image_checks.finish(&name, hash, state);
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "state": "running" })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WakeRequest {
    /// `MAC`, `NAME` or `@GROUP`, several separated by commas.
    to: String,
}

/// `POST /api/v1/wake` `{"to": "..."}`: Wake-on-LAN packets for the machines named.
async fn wake(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<WakeRequest>, JsonRejection>,
) -> ApiResult {
    admin(&s.lab, &headers, &s.admin_token)?;
    let request = json_body(body)?;
    let lab = Arc::clone(&s.lab);
    let woken = tokio::task::spawn_blocking(move || {
        let macs = lab.resolve_targets(&request.to)?;
        crate::lab::wake::wake(&lab.config.interface, &macs)?;
        Ok::<_, LabError>(macs)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let woken: Vec<String> = woken.iter().map(ToString::to_string).collect();
    Ok(Json(serde_json::json!({ "woken": woken })).into_response())
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

#[cfg(test)]
mod tests {
    use crate::http::tests::exchange_from;
    use diskcast_proto::report::{AgentReport, InventoryReport, ReportStep};
    use std::net::SocketAddr;

    /// One request; the status and the body.
    fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange_from([127, 0, 0, 1], addr, request.as_bytes());
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    }

    /// A 3 MiB image named `name` in the lab's store.
    fn stored(lab: &crate::lab::Lab, name: &str) {
        let mut raw = vec![0u8; 3 << 20];
        raw[..1 << 20].fill(7);
        lab.store.import(name, &mut &raw[..], "test", 3).unwrap();
    }

    const PC: &str = "52:54:00:00:00:21";

    #[test]
    fn writes_need_the_admin_token_and_bad_requests_store_nothing() {
        let (addr, lab, token) = crate::testing::web_server("api-auth", "");
        stored(&lab, "golden");
        let deploy = format!(r#"{{"kind":"deploy","image":"golden","to":"{PC}"}}"#);
        // Reading is open; writing is not.
        assert_eq!(call(addr, "GET", "/api/v1/machines", None, "").0, 200);
        for bad_token in [None, Some("nope"), Some(&token[1..])] {
            let (status, body) = call(addr, "POST", "/api/v1/tasks", bad_token, &deploy);
            assert_eq!(status, 401, "{body}");
            assert!(json(&body)["error"].as_str().unwrap().contains("token"));
        }
        let t = Some(token.as_str());
        let refused = [
            ("{not json", 400),
            (r#"{"kind":"deploy","image":"golden"}"#, 400),
            (r#"{"kind":"paint","to":"52:54:00:00:00:21"}"#, 400),
            (
                r#"{"kind":"deploy","image":"nope","to":"52:54:00:00:00:21"}"#,
                404,
            ),
            (
                r#"{"kind":"deploy","image":"../x","to":"52:54:00:00:00:21"}"#,
                400,
            ),
            (
                r#"{"kind":"deploy","image":"golden","to":"no-such-name"}"#,
                404,
            ),
            (r#"{"kind":"deploy","image":"golden","to":"@empty"}"#, 404),
            (
                r#"{"kind":"capture","image":"golden","to":"52:54:00:00:00:21"}"#,
                409,
            ),
            (
                r#"{"kind":"inventory","to":"52:54:00:00:00:21","colour":"red"}"#,
                400,
            ),
            (
                r#"{"kind":"deploy","image":"golden","to":"52:54:00:00:00:21","options":{"disk":"serial:A B"}}"#,
                400,
            ),
        ];
        for (body, want) in refused {
            let (status, answer) = call(addr, "POST", "/api/v1/tasks", t, body);
            assert_eq!(status, want, "{body} -> {answer}");
            assert!(json(&answer)["error"].is_string(), "{answer}");
        }
        assert_eq!(lab.registry.tasks(Default::default()).unwrap().len(), 0);
        assert_eq!(call(addr, "GET", "/api/v1/machines/zz", None, "").0, 400);
        assert_eq!(call(addr, "GET", "/api/v1/tasks/999", None, "").0, 404);
        // One open task per machine.
        assert_eq!(call(addr, "POST", "/api/v1/tasks", t, &deploy).0, 201);
        let (status, body) = call(addr, "POST", "/api/v1/tasks", t, &deploy);
        assert_eq!(status, 409, "{body}");
        // Machines: names are checked, a busy machine is not forgotten.
        let path = format!("/api/v1/machines/{PC}");
        assert_eq!(call(addr, "PATCH", &path, t, r#"{"name":"a b"}"#).0, 400);
        assert_eq!(
            call(addr, "PATCH", &path, t, r#"{"local_boot":"floppy"}"#).0,
            400
        );
        let (status, body) = call(
            addr,
            "PATCH",
            &path,
            t,
            r#"{"name":"pc-21","group":"room"}"#,
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["name"], "pc-21");
        assert_eq!(call(addr, "DELETE", &path, t, "").0, 409);
        assert_eq!(call(addr, "DELETE", &path, None, "").0, 401);
    }

    #[test]
    fn a_deploy_task_boots_the_agent_once_and_its_reports_carry_it_to_verified() {
        let (addr, lab, token) = crate::testing::web_server("api-task", "");
        stored(&lab, "golden");
        let body = format!(r#"{{"kind":"deploy","image":"golden","to":"{PC}"}}"#);
        let (status, created) = call(addr, "POST", "/api/v1/tasks", Some(&token), &body);
        assert_eq!(status, 201, "{created}");
        let id = json(&created)[0]["id"].as_u64().unwrap();
        let script = |lab: &crate::lab::Lab| lab.boot_script(PC.parse().unwrap(), 100).unwrap();
        let first = script(&lab);
        assert!(first.contains("diskcast.role=slave"), "{first}");
        assert!(first.contains(&format!("diskcast.task={id}")), "{first}");
        let agent_line = first.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let agent = diskcast_proto::cmdline::BootConfig::parse(agent_line).unwrap();
        let task_token = agent.task.unwrap().token;
        let session = lab.config.image_session("golden");
        assert_eq!((agent.group, agent.port), (session.group, session.port));
        let report = |token: &str, task: u64, step: ReportStep| {
            let report = AgentReport {
                mac: PC.parse().unwrap(),
                task: Some(task),
                token: token.to_string(),
                step,
            };
            call(
                addr,
                "POST",
                "/api/v1/agent/report",
                None,
                &serde_json::to_string(&report).unwrap(),
            )
            .0
        };
        // A wrong token, or the right one for another task number, is refused.
        assert_eq!(report(&"0".repeat(64), id, ReportStep::Joined), 401);
        assert_eq!(report(&task_token, id + 1, ReportStep::Joined), 401);
        let booted = ReportStep::Booted {
            inventory: InventoryReport::default(),
        };
        assert_eq!(report(&task_token, id, booted), 204);
        let disk = ReportStep::DiskChosen { disk: "vda".into() };
        assert_eq!(report(&task_token, id, disk), 204);
        // A machine that reboots mid-task gets a new token; the old one stops working.
        let second = script(&lab);
        assert!(second.contains("diskcast.role=slave"));
        assert_eq!(report(&task_token, id, ReportStep::Joined), 401);
        let line = second.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let new_token = diskcast_proto::cmdline::BootConfig::parse(line)
            .unwrap()
            .task
            .unwrap()
            .token;
        assert_eq!(report(&new_token, id, ReportStep::Joined), 204);
        assert_eq!(report(&new_token, id, ReportStep::Verified), 204);
        let (_, task) = call(addr, "GET", &format!("/api/v1/tasks/{id}"), None, "");
        let task = json(&task);
        assert_eq!(task["task"]["state"], "verified");
        assert!(task["events"].as_array().unwrap().len() >= 5);
        // Consumed: the next boot is the local disk.
        let after = script(&lab);
        assert!(
            after.contains("sanboot") && after.contains("no task"),
            "{after}"
        );
        assert!(!after.contains("diskcast.role"));
    }

    #[test]
    fn agents_trust_only_the_keys_their_task_names_and_masters_sign() {
        let (addr, lab, token) = crate::testing::web_server("api-trust", "");
        stored(&lab, "golden");
        let t = Some(token.as_str());
        let agent_of = |mac: &str| {
            let script = lab.boot_script(mac.parse().unwrap(), 100).unwrap();
            let line = script.lines().find(|l| l.starts_with("kernel ")).unwrap();
            diskcast_proto::cmdline::BootConfig::parse(line).unwrap()
        };
        // Deploy: the server's key and nothing else.
        let deploy = format!(r#"{{"kind":"deploy","image":"golden","to":"{PC}"}}"#);
        assert_eq!(call(addr, "POST", "/api/v1/tasks", t, &deploy).0, 201);
        let server = diskcast_proto::trust::Trust::Keys(vec![lab.key.public()]);
        assert_eq!(agent_of(PC).trust, Some(server));
        // Receive: refused while nobody says whose session to join.
        let slave = "52:54:00:00:00:22";
        let receive = format!(r#"{{"kind":"receive","to":"{slave}"}}"#);
        let (status, body) = call(addr, "POST", "/api/v1/tasks", t, &receive);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("--trust"), "{body}");
        let bad = format!(r#"{{"kind":"receive","to":"{slave}","options":{{"trust":"12ab"}}}}"#);
        assert_eq!(call(addr, "POST", "/api/v1/tasks", t, &bad).0, 400);
        let wrong_kind = format!(
            r#"{{"kind":"capture","image":"new","to":"{slave}","options":{{"trust":"any"}}}}"#
        );
        assert_eq!(call(addr, "POST", "/api/v1/tasks", t, &wrong_kind).0, 400);
        // A master task first: it signs with a key of its own, which receive tasks trust.
        let master = "52:54:00:00:00:23";
        let body = format!(r#"{{"kind":"master","to":"{master}"}}"#);
        assert_eq!(call(addr, "POST", "/api/v1/tasks", t, &body).0, 201);
        let (status, body) = call(addr, "POST", "/api/v1/tasks", t, &receive);
        assert_eq!(status, 201, "{body}");
        let signer = agent_of(master).sign.expect("a master task signs");
        assert_ne!(
            signer.public(),
            lab.key.public(),
            "never the server's own secret"
        );
        let script = lab.boot_script(master.parse().unwrap(), 101).unwrap();
        assert!(!script.contains(&lab.key.secret_hex()));
        let trust = agent_of(slave).trust.unwrap();
        assert_eq!(
            trust,
            diskcast_proto::trust::Trust::Keys(vec![signer.public()])
        );
    }

    #[test]
    fn an_unknown_machine_is_never_written_and_inventoried_once_if_asked() {
        let (_, lab, _) = crate::testing::web_server("api-unknown", "");
        let stranger = "52:54:00:00:00:99".parse().unwrap();
        let script = lab.boot_script(stranger, 100).unwrap();
        assert!(script.contains("not registered"), "{script}");
        assert!(!script.contains("diskcast.role"));
        let machine = lab.registry.machine(stranger).unwrap().unwrap();
        assert!(!machine.known, "recorded as discovered");

        let (_, lab, _) = crate::testing::web_server("api-unknown-inventory", "");
        let mut config = lab.config.clone();
        config.lab.unknown_machines = crate::config::UnknownMachines::Inventory;
        let lab = crate::lab::Lab::new(
            config,
            lab.registry.clone(),
            lab.store.clone(),
            lab.server_ip,
            lab.key.clone(),
        );
        let first = lab.boot_script(stranger, 100).unwrap();
        assert!(first.contains("diskcast.role=inventory"), "{first}");
        let task = lab.registry.open_task_for(stranger).unwrap().unwrap();
        assert_eq!(task.kind, diskcast_registry::TaskKind::Inventory);
        // Once it reported what it has, it boots locally.
        lab.registry.record_inventory(stranger, "{}", 110).unwrap();
        lab.registry
            .report(
                task.id,
                diskcast_registry::Report {
                    at: 110,
                    step: diskcast_registry::Step::Booted,
                },
            )
            .unwrap();
        lab.registry
            .report(
                task.id,
                diskcast_registry::Report {
                    at: 111,
                    step: diskcast_registry::Step::Verified,
                },
            )
            .unwrap();
        let next = lab.boot_script(stranger, 120).unwrap();
        assert!(!next.contains("diskcast.role"), "{next}");
    }
}
