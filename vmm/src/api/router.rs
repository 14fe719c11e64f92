//! Route table and dispatch from parsed requests to a [`VmController`].
//!
//! [`ROUTES`] is the single source of truth: dispatch, the 405 `Allow` header and
//! the OpenAPI consistency test all read it. To add an endpoint, write a handler and
//! add one entry (plus the controller method it calls).

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::http::{Method, Request, Response};
use super::{ApiError, VmController, VmStateRequest};

/// A handler turns a request into a response using the controller.
pub type Handler = fn(&mut dyn VmController, &Request) -> Result<Response, ApiError>;

/// One routed (method, path) pair.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub handler: Handler,
}

/// Every endpoint of the API. `docs/openapi.json` must list exactly these.
pub const ROUTES: &[Route] = &[
    Route {
        method: Method::Get,
        path: "/vm",
        handler: get_vm,
    },
    Route {
        method: Method::Patch,
        path: "/vm",
        handler: patch_vm,
    },
    Route {
        method: Method::Get,
        path: "/memory",
        handler: get_memory,
    },
    Route {
        method: Method::Patch,
        path: "/memory",
        handler: patch_memory,
    },
    Route {
        method: Method::Post,
        path: "/memory/poison",
        handler: post_memory_poison,
    },
    Route {
        method: Method::Get,
        path: "/memory/check",
        handler: get_memory_check,
    },
    Route {
        method: Method::Get,
        path: "/balloon",
        handler: get_balloon,
    },
    Route {
        method: Method::Put,
        path: "/balloon",
        handler: put_balloon,
    },
    Route {
        method: Method::Patch,
        path: "/balloon",
        handler: patch_balloon,
    },
    Route {
        method: Method::Get,
        path: "/balloon/statistics",
        handler: get_balloon_stats,
    },
    Route {
        method: Method::Patch,
        path: "/balloon/statistics",
        handler: patch_balloon_stats,
    },
    Route {
        method: Method::Put,
        path: "/actions",
        handler: put_actions,
    },
];

fn get_vm(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    no_body(req)?;
    Ok(Response::json(&vm.vm_info()))
}

/// Body of `PATCH /vm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStatePatch {
    state: VmStateRequest,
}

fn patch_vm(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    let patch: VmStatePatch = json_body(req)?;
    vm.set_vm_state(patch.state)?;
    Ok(Response::no_content())
}

fn get_memory(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    no_body(req)?;
    Ok(Response::json(&vm.memory_info()))
}

/// Body of `PATCH /memory`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryPatch {
    pool_mib: u64,
}

fn patch_memory(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    let patch: MemoryPatch = json_body(req)?;
    vm.resize_pool(patch.pool_mib)?;
    Ok(Response::no_content())
}

fn post_memory_poison(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    let body: crate::memory::poison::PoisonRequest = json_body(req)?;
    Ok(Response::json(&vm.poison_memory(body)?))
}

fn get_memory_check(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    no_body(req)?;
    Ok(Response::json(&vm.check_memory()))
}

fn get_balloon(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    no_body(req)?;
    Ok(Response::json(&vm.balloon_config()?))
}

fn put_balloon(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    vm.put_balloon(json_body(req)?)?;
    Ok(Response::no_content())
}

/// Body of `PUT /actions` (Firecracker's `InstanceActionInfo`; only
/// `InstanceStart` here).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceAction {
    action_type: String,
}

fn put_actions(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    let a: InstanceAction = json_body(req)?;
    if a.action_type != "InstanceStart" {
        return Err(ApiError::BadRequest(format!(
            "unsupported action_type {:?}; this VMM supports \"InstanceStart\"",
            a.action_type
        )));
    }
    vm.instance_start()?;
    Ok(Response::no_content())
}

/// Body of `PATCH /balloon` (Firecracker's `BalloonUpdate`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonPatch {
    amount_mib: u32,
}

fn patch_balloon(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    let p: BalloonPatch = json_body(req)?;
    vm.patch_balloon(p.amount_mib)?;
    Ok(Response::no_content())
}

fn get_balloon_stats(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    no_body(req)?;
    Ok(Response::json(&vm.balloon_stats()?))
}

/// Body of `PATCH /balloon/statistics` (Firecracker's `BalloonStatsUpdate`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonStatsPatch {
    stats_polling_interval_s: u16,
}

fn patch_balloon_stats(vm: &mut dyn VmController, req: &Request) -> Result<Response, ApiError> {
    let p: BalloonStatsPatch = json_body(req)?;
    vm.patch_balloon_stats(p.stats_polling_interval_s)?;
    Ok(Response::no_content())
}

/// Rejects a body on a request that takes none.
pub fn no_body(req: &Request) -> Result<(), ApiError> {
    if req.body.is_empty() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{} {} takes no body, got {} bytes",
            req.method.as_str(),
            req.path,
            req.body.len()
        )))
    }
}

/// Deserializes the JSON body of `req`, naming the cause on failure.
pub fn json_body<T: DeserializeOwned>(req: &Request) -> Result<T, ApiError> {
    let what = format!("{} {}", req.method.as_str(), req.path);
    if req.content_length.is_none() {
        return Err(ApiError::LengthRequired(format!(
            "{what} needs a JSON body sent with a Content-Length header"
        )));
    }
    if req.body.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{what} needs a JSON body, got none"
        )));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::BadRequest(format!("bad JSON body for {what}: {e}")))
}

/// Routes `req` to its handler. Unknown paths get 404, known paths with another
/// method get 405 with an `Allow` header, handler errors their own status.
pub fn dispatch(vm: &mut dyn VmController, req: &Request) -> Response {
    let mut allowed = Vec::new();
    for route in ROUTES.iter().filter(|r| r.path == req.path) {
        if route.method == req.method {
            return match (route.handler)(vm, req) {
                Ok(resp) => resp,
                Err(e) => Response::fault(e.status(), &e.to_string()),
            };
        }
        allowed.push(route.method.as_str());
    }
    if allowed.is_empty() {
        let paths: Vec<&str> = ROUTES.iter().map(|r| r.path).collect();
        let mut paths = paths;
        paths.dedup();
        return Response::fault(
            404,
            &format!(
                "no such path {:?}; known paths: {}",
                req.path,
                paths.join(", ")
            ),
        );
    }
    let allow = allowed.join(", ");
    let mut resp = Response::fault(
        405,
        &format!(
            "method {} not allowed on {}; allowed: {allow}",
            req.method.as_str(),
            req.path
        ),
    );
    resp.allow = Some(allow);
    resp
}

#[cfg(test)]
mod tests {
    use super::super::test_support::TestVm;
    use super::super::{VmInfo, VmState};
    use super::*;
    use std::collections::BTreeSet;

    fn req(method: Method, path: &str, body: Option<&str>) -> Request {
        Request {
            method,
            path: path.to_string(),
            headers: Vec::new(),
            content_length: body.map(str::len),
            body: body.unwrap_or("").as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    fn fault_of(resp: &Response) -> String {
        let v: serde_json::Value = serde_json::from_slice(resp.body.as_ref().unwrap()).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn get_vm_returns_controller_info() {
        let mut vm = TestVm::new();
        vm.vcpus = 3;
        let resp = dispatch(&mut vm, &req(Method::Get, "/vm", None));
        assert_eq!(resp.status, 200);
        let info: VmInfo = serde_json::from_slice(resp.body.as_ref().unwrap()).unwrap();
        assert_eq!(
            info,
            VmInfo {
                state: VmState::Running,
                vcpus: 3,
                mem_mib: 256,
                emulation_assists: None,
            }
        );
    }

    #[test]
    fn patch_vm_pauses_and_resumes() {
        let mut vm = TestVm::new();
        let resp = dispatch(
            &mut vm,
            &req(Method::Patch, "/vm", Some(r#"{"state":"Paused"}"#)),
        );
        assert_eq!(resp.status, 204);
        assert_eq!(resp.body, None);
        assert_eq!(vm.state, VmState::Paused);
        // The controller's own error passes through with its status.
        let resp = dispatch(
            &mut vm,
            &req(Method::Patch, "/vm", Some(r#"{"state":"Paused"}"#)),
        );
        assert_eq!(resp.status, 409);
        assert!(fault_of(&resp).contains("Paused"), "{}", fault_of(&resp));
        let resp = dispatch(
            &mut vm,
            &req(Method::Patch, "/vm", Some(r#"{"state":"Resumed"}"#)),
        );
        assert_eq!(resp.status, 204);
        assert_eq!(vm.state, VmState::Running);
    }

    #[test]
    fn patch_vm_rejects_bad_bodies() {
        let cases = [
            (r#"{"state":"Paused","x":1}"#, "unknown field `x`"),
            (r#"{"state":"Sleeping"}"#, "unknown variant `Sleeping`"),
            (r#"{}"#, "missing field `state`"),
            (r#"{"state":"Paused""#, "EOF"),
            ("", "needs a JSON body"),
        ];
        for (body, cause) in cases {
            let mut vm = TestVm::new();
            let resp = dispatch(&mut vm, &req(Method::Patch, "/vm", Some(body)));
            assert_eq!(resp.status, 400, "{body}");
            assert!(
                fault_of(&resp).contains(cause),
                "{body}: {}",
                fault_of(&resp)
            );
            assert_eq!(vm.state, VmState::Running);
        }
        let mut vm = TestVm::new();
        let resp = dispatch(&mut vm, &req(Method::Patch, "/vm", None));
        assert_eq!(resp.status, 411);
        assert!(fault_of(&resp).contains("Content-Length"));
    }

    #[test]
    fn get_rejects_a_body() {
        let mut vm = TestVm::new();
        let resp = dispatch(&mut vm, &req(Method::Get, "/vm", Some("{}")));
        assert_eq!(resp.status, 400);
        assert!(fault_of(&resp).contains("takes no body"));
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_405() {
        let mut vm = TestVm::new();
        let resp = dispatch(&mut vm, &req(Method::Get, "/nope", None));
        assert_eq!(resp.status, 404);
        assert!(fault_of(&resp).contains("/nope"));
        let resp = dispatch(&mut vm, &req(Method::Delete, "/vm", None));
        assert_eq!(resp.status, 405);
        assert_eq!(resp.allow.as_deref(), Some("GET, PATCH"));
        assert!(fault_of(&resp).contains("DELETE"));
        let resp = dispatch(&mut vm, &req(Method::Other("BREW".into()), "/memory", None));
        assert_eq!(resp.status, 405);
        assert_eq!(resp.allow.as_deref(), Some("GET, PATCH"));
        let resp = dispatch(&mut vm, &req(Method::Put, "/memory/check", None));
        assert_eq!(resp.status, 405);
        assert_eq!(resp.allow.as_deref(), Some("GET"));
    }

    #[test]
    fn patch_memory_needs_pool_mib_and_a_resizable_pool() {
        let mut vm = TestVm::new();
        for bad in [r#"{}"#, r#"{"pool_mib": -1}"#, r#"{"pool_mib": 8, "x": 1}"#] {
            let resp = dispatch(&mut vm, &req(Method::Patch, "/memory", Some(bad)));
            assert_eq!(resp.status, 400, "{bad}");
        }
        let resp = dispatch(
            &mut vm,
            &req(Method::Patch, "/memory", Some(r#"{"pool_mib": 8}"#)),
        );
        assert_eq!(resp.status, 400);
        assert!(
            fault_of(&resp).contains("frame pool"),
            "{}",
            fault_of(&resp)
        );
    }

    #[test]
    fn get_memory_returns_controller_value() {
        let mut vm = TestVm::new();
        let resp = dispatch(&mut vm, &req(Method::Get, "/memory", None));
        assert_eq!(resp.status, 200);
        let v: serde_json::Value = serde_json::from_slice(resp.body.as_ref().unwrap()).unwrap();
        assert_eq!(v, vm.memory_info());
    }

    const OPENAPI: &str = include_str!("../../../docs/openapi.json");
    const HTTP_METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn openapi() -> serde_json::Value {
        serde_json::from_str(OPENAPI).expect("docs/openapi.json is not valid JSON")
    }

    #[test]
    fn openapi_document_matches_route_table() {
        let doc = openapi();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for key in item.as_object().unwrap().keys() {
                if HTTP_METHODS.contains(&key.as_str()) {
                    documented.insert((path.clone(), key.to_uppercase()));
                }
            }
        }
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.path.to_string(), r.method.as_str().to_string()))
            .collect();
        assert_eq!(routed.len(), ROUTES.len(), "duplicate entry in ROUTES");
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routed but not in docs/openapi.json: {undocumented:?}; \
             documented but not routed: {unrouted:?}"
        );
        // And dispatch really reaches a handler for each documented operation.
        for (path, method) in documented {
            let mut vm = TestVm::new();
            let m = Method::parse(&method);
            let resp = dispatch(&mut vm, &req(m, &path, None));
            assert!(
                resp.status != 404 && resp.status != 405,
                "{method} {path} documented but dispatch says {}",
                resp.status
            );
        }
    }

    #[test]
    fn openapi_schemas_match_types() {
        let doc = openapi();
        let schemas = &doc["components"]["schemas"];
        let states: Vec<serde_json::Value> = VmState::ALL
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        assert_eq!(schemas["VmState"]["enum"].as_array().unwrap(), &states);
        let reqs: Vec<serde_json::Value> = [VmStateRequest::Paused, VmStateRequest::Resumed]
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        assert_eq!(
            schemas["VmStateUpdate"]["properties"]["state"]["enum"]
                .as_array()
                .unwrap(),
            &reqs
        );
        let info = serde_json::to_value(TestVm::new().vm_info()).unwrap();
        let mut fields: Vec<&String> = info.as_object().unwrap().keys().collect();
        // Optional properties (not in `required`) may be absent.
        let required = schemas["VmInfo"]["required"].as_array().unwrap();
        let mut documented: Vec<&String> = schemas["VmInfo"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| info.get(*k).is_some() || required.iter().any(|r| r == *k))
            .collect();
        fields.sort();
        documented.sort();
        assert_eq!(fields, documented);
        assert!(schemas["Error"]["properties"]["fault_message"].is_object());
    }

    /// The top-level keys `value` serializes to are the schema's properties
    /// (optional properties may be absent).
    fn assert_schema_keys(name: &str, value: serde_json::Value) {
        let doc = openapi();
        let schema = &doc["components"]["schemas"][name];
        let required = schema["required"].as_array().cloned().unwrap_or_default();
        let mut fields: Vec<&String> = value.as_object().unwrap().keys().collect();
        let mut documented: Vec<&String> = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name} has no properties"))
            .keys()
            .filter(|k| value.get(*k).is_some() || required.iter().any(|r| r == *k))
            .collect();
        fields.sort();
        documented.sort();
        assert_eq!(fields, documented, "schema {name} vs the Rust type");
    }

    #[test]
    fn openapi_memory_and_balloon_schemas_match_types() {
        use crate::devices::virtio::balloon::worker::BalloonStatsReport;
        use crate::devices::virtio::balloon::BalloonConfig;
        let check = crate::memory::check::CheckReport::default();
        assert_schema_keys("MemoryCheck", serde_json::to_value(check).unwrap());
        let cfg = BalloonConfig::parse_cli("amount_mib=1,deflate_on_oom=true").unwrap();
        assert_schema_keys("Balloon", serde_json::to_value(cfg).unwrap());
        let stats = BalloonStatsReport {
            target_pages: 0,
            actual_pages: 0,
            target_mib: 0,
            actual_mib: 0,
            guest: Default::default(),
            counters: Default::default(),
            transport: Default::default(),
            ballooned_pages: 0,
            negotiated_features: 0,
        };
        assert_schema_keys("BalloonStats", serde_json::to_value(stats).unwrap());
        let poison = crate::memory::poison::PoisonReport {
            gpa: Some(0),
            kind: crate::memory::poison::PoisonKind::Hard,
            action: crate::vstate::mce::McAction::Required,
            outcome: "mapped".into(),
            frame: 0,
            inject_now: false,
        };
        assert_schema_keys("PoisonReport", serde_json::to_value(poison).unwrap());
    }
}
