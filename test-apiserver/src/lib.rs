//! A small Kubernetes API server for tests: the real list/watch protocol for the kinds the
//! agent follows (`/api/v1/<plural>`, `/apis/<group>/<version>/<plural>`), objects as JSON
//! with resource versions, watch events as
//! newline-delimited JSON, bookmarks, and `410 Gone` for expired resource versions, so the
//! real `kube` client and watcher run unchanged against it. For the controller: namespaced
//! objects read (`GET`), created (`POST`, 409 if present), replaced (`PUT`, 409 unless the
//! resource version is the current one: optimistic concurrency, as Leases rely on), and
//! status written through the status subresource (`PATCH .../status`, a JSON merge patch of
//! `status` only), objects patched (`PATCH`, a JSON merge patch) and deleted, each write an
//! event for the watchers. TokenReview answers for the tokens a
//! test issued. Every request is remembered as the (group, resource, verb) an RBAC rule would
//! have to allow, so tests can hold the code to its declared permissions. Plain HTTP, or TLS
//! for clients that take their configuration from inside a pod (`KUBERNETES_SERVICE_HOST`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from before this resource version get 410 Gone.
    compacted: u64,
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (resource version, plural, event type, object).
    log: Vec<(u64, String, &'static str, Value)>,
    /// List requests served.
    lists: usize,
    /// Status subresource patches: (plural, namespace, name, the patch).
    status_patches: Vec<(String, String, String, Value)>,
    /// Service account tokens the TokenReview endpoint knows.
    tokens: BTreeMap<String, IssuedToken>,
    /// Every request as RBAC sees it: (API group, resource[/subresource], verb), and by the
    /// bearer token it carried (`""` for none).
    accesses: std::collections::BTreeSet<(String, String, String)>,
    accesses_by: BTreeMap<String, std::collections::BTreeSet<(String, String, String)>>,
}

/// A service account token as the API server issued it.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// `system:serviceaccount:<ns>:<name>`.
    pub user: String,
    /// The audiences it was minted for.
    pub audiences: Vec<String>,
    /// The node of the pod it is bound to, if bound to a pod.
    pub node: Option<String>,
    pub expired: bool,
}

impl State {
    /// Stores `object` (new or replacing) at the next resource version and logs the event.
    fn store(&mut self, plural: &str, mut object: Value) -> Value {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let namespace = if kind == "Namespace" {
            String::new()
        } else {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            object["metadata"]["namespace"] = json!(ns);
            ns
        };
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        // A real server assigns the UID at creation; tests that need to know it (to place
        // a pod's process in its kubelet cgroup) give it in the object, and it is kept.
        if !object["metadata"]["uid"].is_string() {
            object["metadata"]["uid"] = json!(format!("uid-{kind}-{namespace}-{name}"));
        }
        let key = (plural.to_owned(), namespace, name);
        let event = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key.clone(), object.clone());
        self.log.push((rv, key.0, event, object.clone()));
        object
    }
}

/// A running test API server.
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
}

#[derive(Clone, Debug)]
enum Change {
    Event,
    Expired,
}

/// The kinds served: kind, plural, apiVersion.
const KINDS: &[(&str, &str, &str)] = &[
    ("Namespace", "namespaces", "v1"),
    ("Pod", "pods", "v1"),
    ("Service", "services", "v1"),
    ("EndpointSlice", "endpointslices", "discovery.k8s.io/v1"),
    ("MeshPolicy", "meshpolicies", "weft.dev/v1alpha1"),
    (
        "MeshAuthentication",
        "meshauthentications",
        "weft.dev/v1alpha1",
    ),
    ("Lease", "leases", "coordination.k8s.io/v1"),
    ("DaemonSet", "daemonsets", "apps/v1"),
    ("ConfigMap", "configmaps", "v1"),
];

fn plural(kind: &str) -> String {
    KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, plural, _)| (*plural).to_owned())
        .unwrap_or_else(|| panic!("the test API server does not serve {kind}"))
}

/// The kind and apiVersion at a request path, if served.
fn kind_at(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    let (api_version, plural) = match path.strip_prefix("/api/v1/") {
        Some(plural) => ("v1".to_owned(), plural),
        None => {
            let rest = path.strip_prefix("/apis/")?;
            let (group_version, plural) = rest.rsplit_once('/')?;
            (group_version.to_owned(), plural)
        }
    };
    KINDS
        .iter()
        .find(|(_, p, v)| *p == plural && *v == api_version)
        .copied()
}

impl ApiServer {
    /// Serves plain HTTP on a new loopback port.
    pub async fn start() -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, None)
    }

    /// Serves on `listener`, over TLS with `tls` when given (HTTP/1.1).
    pub fn serve(
        listener: tokio::net::TcpListener,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> ApiServer {
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let state = Arc::new(Mutex::new(State::default()));
        let (changes, _) = broadcast::channel(1024);
        let server = ApiServer {
            addr,
            state: state.clone(),
            changes: changes.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (state, changes) = (state.clone(), changes.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (state, changes) = (state.clone(), changes.clone());
                        async move { Ok::<_, Infallible>(handle(req, state, changes).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces every object of a multi-document YAML text.
    pub fn apply(&self, yaml: &str) {
        let mut state = self.state.lock().unwrap();
        let documents: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
        for object in documents {
            let kind = object["kind"].as_str().unwrap().to_owned();
            state.store(&plural(&kind), object);
        }
        drop(state);
        let _ = self.changes.send(Change::Event);
    }

    /// Deletes the object `namespace/name` of `kind` (a `DELETED` event for watchers);
    /// whether it was there.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let key = (plural(kind), namespace.to_owned(), name.to_owned());
        let mut state = self.state.lock().unwrap();
        let Some(object) = state.objects.remove(&key) else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        state.log.push((rv, key.0, "DELETED", object));
        drop(state);
        let _ = self.changes.send(Change::Event);
        true
    }

    /// The object `namespace/name` of `kind` as stored now.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (plural(kind), namespace.to_owned(), name.to_owned());
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Status patches served so far: (plural, namespace, name, patch).
    pub fn status_patches(&self) -> Vec<(String, String, String, Value)> {
        self.state.lock().unwrap().status_patches.clone()
    }

    /// Every request served so far as RBAC sees it: (API group, resource, verb), e.g.
    /// `("coordination.k8s.io", "leases", "update")`, `("weft.dev", "meshpolicies/status",
    /// "patch")`.
    pub fn accesses(&self) -> Vec<(String, String, String)> {
        self.state
            .lock()
            .unwrap()
            .accesses
            .iter()
            .cloned()
            .collect()
    }

    /// The requests made with the bearer token `token`, as [`ApiServer::accesses`].
    pub fn accesses_of(&self, token: &str) -> Vec<(String, String, String)> {
        self.state
            .lock()
            .unwrap()
            .accesses_by
            .get(token)
            .map(|a| a.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// List requests served so far (a relist after 410 Gone adds to it).
    pub fn lists(&self) -> usize {
        self.state.lock().unwrap().lists
    }

    /// Makes `token` known to TokenReview as `issued`.
    pub fn issue_token(&self, token: &str, issued: IssuedToken) {
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), issued);
    }

    /// Forgets history: running watches end with `410 Gone` and watchers must list again.
    pub fn expire(&self) {
        let mut state = self.state.lock().unwrap();
        state.compacted = state.rv + 1;
        state.log.clear();
        drop(state);
        let _ = self.changes.send(Change::Expired);
    }
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn full(status: u16, value: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}})
}

/// A namespaced path (`.../namespaces/<ns>/<plural>[/<name>[/<subresource>]]`).
struct ObjectPath {
    /// Kind, plural, apiVersion.
    kind: (&'static str, &'static str, &'static str),
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn object_at(path: &str) -> Option<ObjectPath> {
    let (group_version, rest) = match path.strip_prefix("/api/v1/namespaces/") {
        Some(rest) => ("v1".to_owned(), rest),
        None => {
            let rest = path.strip_prefix("/apis/")?;
            let (group_version, rest) = rest.split_once("/namespaces/")?;
            (group_version.to_owned(), rest)
        }
    };
    let mut parts = rest.split('/');
    let namespace = parts.next()?.to_owned();
    let plural = parts.next()?;
    let name = parts.next().map(str::to_owned);
    let subresource = parts.next().map(str::to_owned);
    let kind = KINDS
        .iter()
        .find(|(_, p, v)| *p == plural && *v == group_version)
        .copied()?;
    Some(ObjectPath {
        kind,
        namespace,
        name,
        subresource,
    })
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "message": message, "code": code}),
    )
}

/// Reads, creates, replaces or patches the status of one namespaced object.
async fn object_request(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some(ObjectPath {
        kind: (kind, plural, _),
        namespace,
        name,
        subresource,
    }) = object_at(&path)
    else {
        return status(404, "NotFound", &format!("no route {path}"));
    };
    let method = req.method().clone();
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body: Value = match body {
        Ok(bytes) if bytes.is_empty() => Value::Null,
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(value) => value,
            Err(e) => return status(400, "BadRequest", &e.to_string()),
        },
        Err(e) => return status(400, "BadRequest", &e.to_string()),
    };
    let mut state = state.lock().unwrap();
    let key = |name: &str| (plural.to_owned(), namespace.clone(), name.to_owned());
    let not_found = |name: &str| status(404, "NotFound", &format!("{plural} {name:?} not found"));
    let response = match (method.as_str(), name, subresource.as_deref()) {
        ("GET", Some(name), None) => match state.objects.get(&key(&name)) {
            Some(object) => full(200, object.clone()),
            None => not_found(&name),
        },
        ("POST", None, None) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if state.objects.contains_key(&key(&name)) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{plural} {name:?} already exists"),
                );
            }
            let mut object = body;
            object["kind"] = json!(kind);
            object["metadata"]["namespace"] = json!(namespace);
            full(201, state.store(plural, object))
        }
        ("PUT", Some(name), None) => {
            let Some(current) = state.objects.get(&key(&name)) else {
                return not_found(&name);
            };
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {plural} {name:?}: the object has been modified"
                    ),
                );
            }
            let mut object = body;
            object["kind"] = json!(kind);
            object["metadata"]["namespace"] = json!(namespace);
            full(200, state.store(plural, object))
        }
        ("PATCH", Some(name), Some("status")) => {
            let Some(current) = state.objects.get(&key(&name)) else {
                return not_found(&name);
            };
            let mut object = current.clone();
            merge(&mut object["status"], &body["status"]);
            state
                .status_patches
                .push((plural.to_owned(), namespace.clone(), name, body));
            full(200, state.store(plural, object))
        }
        ("PATCH", Some(name), None) => {
            let Some(current) = state.objects.get(&key(&name)) else {
                return not_found(&name);
            };
            let mut object = current.clone();
            merge(&mut object, &body);
            full(200, state.store(plural, object))
        }
        (method, name, sub) => status(
            405,
            "MethodNotAllowed",
            &format!("{method} {plural} {name:?} {sub:?} is not served by the test API server"),
        ),
    };
    drop(state);
    let _ = changes.send(Change::Event);
    response
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(k);
                } else {
                    merge(target.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (_, Some(_)) => {
            *target = json!({});
            merge(target, patch);
        }
        _ => *target = patch.clone(),
    }
}

/// What RBAC would check for a request: (API group, resource[/subresource], verb), as the API
/// server's request-info reads a path.
pub fn rbac_access(method: &str, path: &str, query: &str) -> Option<(String, String, String)> {
    let (group, rest) = match path.strip_prefix("/api/v1/") {
        Some(rest) => ("", rest),
        None => {
            let rest = path.strip_prefix("/apis/")?;
            let (group, rest) = rest.split_once('/')?;
            let (_version, rest) = rest.split_once('/')?;
            (group, rest)
        }
    };
    let mut parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    // `namespaces/<ns>/<resource>...` is the namespaced form; `namespaces[/<name>]` alone is
    // the Namespace resource itself.
    if parts.len() > 2 && parts[0] == "namespaces" {
        parts.drain(..2);
    }
    let resource = match parts.as_slice() {
        [plural] | [plural, _] => (*plural).to_owned(),
        [plural, _, sub] => format!("{plural}/{sub}"),
        _ => return None,
    };
    let named = parts.len() >= 2;
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some((group.to_owned(), resource, verb.to_owned()))
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
) -> Response<Body> {
    if let Some(access) = rbac_access(
        req.method().as_str(),
        req.uri().path(),
        req.uri().query().unwrap_or(""),
    ) {
        let bearer = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        let mut state = state.lock().unwrap();
        state.accesses.insert(access.clone());
        state.accesses_by.entry(bearer).or_default().insert(access);
    }
    if req.method() == hyper::Method::POST
        && req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        return token_review(req, &state).await;
    }
    let collection = kind_at(req.uri().path());
    if collection.is_none() || req.method() != hyper::Method::GET {
        return object_request(req, state, changes).await;
    }
    let Some((kind, plural, api_version)) = collection else {
        return full(404, json!({"kind": "Status", "code": 404}));
    };
    let plural = plural.to_owned();
    let q = query(&req);
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        let mut state = state.lock().unwrap();
        state.lists += 1;
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == plural)
            .map(|(_, o)| o.clone())
            .collect();
        return full(
            200,
            json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut rx = changes.subscribe();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        let mut sent = from;
        loop {
            let (pending, expired, rv) = {
                let state = state.lock().unwrap();
                let expired = from < state.compacted && sent < state.compacted;
                let pending: Vec<(u64, Value)> = state
                    .log
                    .iter()
                    .filter(|(rv, p, _, _)| *rv > sent && *p == plural)
                    .map(|(rv, _, t, o)| (*rv, json!({"type": t, "object": o})))
                    .collect();
                (pending, expired, state.rv)
            };
            if expired {
                let _ = tx.send(line(gone())).await;
                return;
            }
            for (rv, event) in pending {
                if tx.send(line(event)).await.is_err() {
                    return;
                }
                sent = rv;
            }
            let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": rv.max(sent).to_string()}}});
            tokio::select! {
                change = rx.recv() => match change {
                    Ok(Change::Expired) => {
                        let _ = tx.send(line(gone())).await;
                        return;
                    }
                    Ok(Change::Event) => {}
                    Err(_) => return,
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if tx.send(line(bookmark)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

/// `POST .../tokenreviews`, as the API server answers it: an unknown or expired token, or one
/// minted for none of the audiences asked, is not authenticated; otherwise the user, the
/// audiences in common, and for a pod-bound token its node in `extra`.
async fn token_review(req: Request<hyper::body::Incoming>, state: &Mutex<State>) -> Response<Body> {
    let Ok(bytes) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(400, "BadRequest", "unreadable body");
    };
    let Ok(review) = serde_json::from_slice::<Value>(&bytes) else {
        return status(400, "BadRequest", "not JSON");
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let issued = state.lock().unwrap().tokens.get(token).cloned();
    let result = match issued {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(t) if t.expired => {
            json!({"authenticated": false, "error": "service account token has expired"})
        }
        Some(t) => {
            let common: Vec<&String> = t.audiences.iter().filter(|a| wanted.contains(a)).collect();
            if common.is_empty() && !wanted.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                let extra = match &t.node {
                    Some(node) => json!({"authentication.kubernetes.io/node-name": [node]}),
                    None => json!({}),
                };
                json!({"authenticated": true, "audiences": common,
                    "user": {"username": t.user, "extra": extra}})
            }
        }
    };
    full(
        201,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": review["spec"], "status": result}),
    )
}

#[cfg(test)]
mod tests {
    use super::rbac_access;

    fn access(method: &str, path: &str, query: &str) -> (String, String, String) {
        rbac_access(method, path, query).unwrap()
    }

    #[test]
    fn requests_read_as_rbac_reads_them() {
        let a = |g: &str, r: &str, v: &str| (g.to_owned(), r.to_owned(), v.to_owned());
        assert_eq!(access("GET", "/api/v1/pods", ""), a("", "pods", "list"));
        assert_eq!(
            access("GET", "/api/v1/namespaces", "watch=true&resourceVersion=3"),
            a("", "namespaces", "watch")
        );
        assert_eq!(
            access("GET", "/api/v1/namespaces/shop", ""),
            a("", "namespaces", "get")
        );
        assert_eq!(
            access("GET", "/api/v1/namespaces/shop/pods/web", ""),
            a("", "pods", "get")
        );
        assert_eq!(
            access(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases/weft-controller",
                ""
            ),
            a("coordination.k8s.io", "leases", "update")
        );
        assert_eq!(
            access(
                "PATCH",
                "/apis/weft.dev/v1alpha1/namespaces/shop/meshpolicies/p/status",
                ""
            ),
            a("weft.dev", "meshpolicies/status", "patch")
        );
        assert_eq!(
            access("POST", "/apis/authentication.k8s.io/v1/tokenreviews", ""),
            a("authentication.k8s.io", "tokenreviews", "create")
        );
        assert_eq!(
            access("GET", "/apis/discovery.k8s.io/v1/endpointslices", "watch=1"),
            a("discovery.k8s.io", "endpointslices", "watch")
        );
    }
}
