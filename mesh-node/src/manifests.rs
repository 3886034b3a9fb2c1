//! The local manifest folder: the same Kubernetes YAML a cluster would hold (multi-document
//! files of Namespace, Pod, Service, EndpointSlice and Weft's MeshPolicy and
//! MeshAuthentication), read with the same types. A file that does not parse
//! is reported with its file, document and reason and ignored, keeping what it held before;
//! the other files keep working. The folder is watched with inotify, so an edit takes effect at
//! once; reading it again every poll is the fallback.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tunnel_proto::file_trust::{Exposure, FileTrustError, check_file, read_trusted};
use tunnel_proto::yaml::YamlFault;

use crate::changes::Changes;
use crate::cluster::{ClusterObjects, Object};

/// The apiVersion of Weft's own kinds.
const WEFT_API_VERSION: &str = "weft.dev/v1alpha1";

/// Why one manifest file was ignored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    /// Another user could change it, or it is too large.
    #[error("{reason}")]
    Refused { file: PathBuf, reason: String },
    #[error("{file}: document {document}{location}: {reason}")]
    Document {
        file: PathBuf,
        /// 1-based.
        document: usize,
        /// ` (line L, column C)` when known.
        location: String,
        reason: String,
    },
    #[error("cannot list the manifest folder {folder}: {reason}")]
    Folder { folder: PathBuf, reason: String },
    #[error(
        "cannot watch the manifest folder {folder} ({reason}); edits are picked up at the next poll instead"
    )]
    Watch { folder: PathBuf, reason: String },
}

/// Largest manifest file read (1,000 pods take about 250 KB).
pub const MAX_MANIFEST_FILE: u64 = 16 << 20;

/// The folder's objects, file by file, with the last good content of each file.
#[derive(Debug, Default)]
pub struct ManifestFolder {
    folder: PathBuf,
    /// Last good content of each file.
    files: BTreeMap<PathBuf, ParsedFile>,
    /// What fails now, by file (the folder's own path for a listing failure), with the text
    /// that failed: the same text is not parsed, nor reported, again.
    failures: BTreeMap<PathBuf, Failure>,
    /// Raised by the folder's inotify watch.
    changes: Arc<Changes>,
    watcher: Option<notify::RecommendedWatcher>,
}

#[derive(Debug)]
struct Failure {
    text: Option<String>,
    error: ManifestError,
}

/// A file's text and what each of its documents held. Kept so that a changed file parses only
/// the documents that changed: flipping one label in a file of a thousand pods parses one.
#[derive(Debug, Default)]
struct ParsedFile {
    text: String,
    documents: Vec<ParsedDocument>,
}

#[derive(Debug)]
struct ParsedDocument {
    text: String,
    objects: Vec<Object>,
    /// How many documents it counts as, for the numbers in error messages.
    documents: usize,
}

impl ManifestFolder {
    pub fn new(folder: &Path) -> Self {
        ManifestFolder {
            folder: folder.to_owned(),
            ..ManifestFolder::default()
        }
    }

    /// Watches the folder with inotify: files written (closed after writing), created,
    /// renamed into or removed from it raise [`ManifestFolder::changed`].
    pub fn watch(&mut self) -> Result<(), ManifestError> {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
        use notify::{RecursiveMode, Watcher};
        let fail = |e: notify::Error| ManifestError::Watch {
            folder: self.folder.clone(),
            reason: e.to_string(),
        };
        let changes = self.changes.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Not on every write: a file read half-written would be reported as broken.
                let complete = match event {
                    Ok(event) => matches!(
                        event.kind,
                        EventKind::Create(_)
                            | EventKind::Remove(_)
                            | EventKind::Modify(ModifyKind::Name(_))
                            | EventKind::Access(AccessKind::Close(AccessMode::Write))
                    ),
                    Err(_) => true, // lost events (queue overflow): look again
                };
                if complete {
                    changes.raise();
                }
            })
            .map_err(fail)?;
        watcher
            .watch(&self.folder, RecursiveMode::NonRecursive)
            .map_err(fail)?;
        self.watcher = Some(watcher);
        Ok(())
    }

    /// Waits until the watch sees a change (never, without a watch).
    pub async fn changed(&self) {
        if self.watcher.is_none() {
            return std::future::pending().await;
        }
        self.changes.raised().await;
    }

    /// Reads the folder again: new and changed files are parsed (a file that fails keeps its
    /// last good objects), removed files drop their objects. Returns whether any file's
    /// objects changed, and the errors not reported before (a file that stays broken is
    /// reported once; [`ManifestFolder::errors`] has every current one).
    pub fn reload(&mut self) -> (bool, Vec<ManifestError>) {
        self.changes.take();
        let mut new_errors = Vec::new();
        let before = self.files.len();
        let listed = match list_yaml(&self.folder) {
            Ok(listed) => {
                self.failures.remove(&self.folder);
                listed
            }
            Err(reason) => {
                let error = ManifestError::Folder {
                    folder: self.folder.clone(),
                    reason,
                };
                self.fail(self.folder.clone(), None, error, &mut new_errors);
                return (false, new_errors);
            }
        };
        self.files.retain(|path, _| listed.contains(path));
        let folder = self.folder.clone();
        self.failures
            .retain(|path, _| *path == folder || listed.contains(path));
        let mut changed = self.files.len() != before;
        for path in listed {
            let text = match read_trusted(&path, MAX_MANIFEST_FILE) {
                Ok(text) => text,
                Err(FileTrustError::Metadata { source, .. }) => {
                    let error = ManifestError::Read {
                        file: path.clone(),
                        reason: source.to_string(),
                    };
                    self.fail(path, None, error, &mut new_errors);
                    continue;
                }
                Err(refused) => {
                    let error = ManifestError::Refused {
                        file: path.clone(),
                        reason: refused.to_string(),
                    };
                    self.fail(path, None, error, &mut new_errors);
                    continue;
                }
            };
            let old = self.files.get(&path);
            if old.is_some_and(|old| old.text == text) {
                self.failures.remove(&path);
                continue;
            }
            if self
                .failures
                .get(&path)
                .is_some_and(|f| f.text.as_deref() == Some(text.as_str()))
            {
                continue;
            }
            match parse_file(&path, &text, old) {
                Ok(documents) => {
                    self.failures.remove(&path);
                    self.files.insert(path, ParsedFile { text, documents });
                    changed = true;
                }
                Err(error) => self.fail(path, Some(text), error, &mut new_errors),
            }
        }
        (changed, new_errors)
    }

    /// Every failure now.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.failures.values().map(|f| f.error.clone()).collect()
    }

    /// Records `path`'s failure, adding it to `new_errors` unless it is the one already known.
    fn fail(
        &mut self,
        path: PathBuf,
        text: Option<String>,
        error: ManifestError,
        new_errors: &mut Vec<ManifestError>,
    ) {
        if self.failures.get(&path).is_none_or(|f| f.error != error) {
            new_errors.push(error.clone());
        }
        self.failures.insert(path, Failure { text, error });
    }

    /// Every object of every file, later files winning on the same name.
    pub fn objects(&self) -> ClusterObjects {
        let mut all = ClusterObjects::default();
        for file in self.files.values() {
            for document in &file.documents {
                for object in &document.objects {
                    all.insert(object.clone());
                }
            }
        }
        all
    }
}

/// The `.yaml` and `.yml` files of `folder`, sorted, not recursing.
fn list_yaml(folder: &Path) -> Result<Vec<PathBuf>, String> {
    // What the folder says is trusted (it names pods' network namespaces): no other user may
    // add to it.
    check_file(folder, Exposure::Trusted).map_err(|e| e.to_string())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Parses every document of one file; the first bad document fails the file.
pub fn parse_documents(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let documents = parse_file(path, text, None)?;
    Ok(documents
        .into_iter()
        .flat_map(|document| document.objects)
        .collect())
}

/// Parses `text`'s documents, reusing the objects of documents whose text is the same in `old`.
fn parse_file(
    path: &Path,
    text: &str,
    old: Option<&ParsedFile>,
) -> Result<Vec<ParsedDocument>, ManifestError> {
    let known: HashMap<&str, &ParsedDocument> = old
        .map(|old| old.documents.iter().map(|d| (d.text.as_str(), d)).collect())
        .unwrap_or_default();
    let mut documents = Vec::new();
    let mut number = 0;
    for chunk in split_documents(text) {
        let before = number;
        let objects = match known.get(chunk.text) {
            Some(known) => {
                number += known.documents;
                known.objects.clone()
            }
            None => parse_chunk(path, &chunk, &mut number)?,
        };
        documents.push(ParsedDocument {
            text: chunk.text.to_owned(),
            objects,
            documents: number - before,
        });
    }
    Ok(documents)
}

/// A piece of a file that starts at a document marker (or the file's start).
struct Chunk<'a> {
    text: &'a str,
    /// 0-based line of the file where it starts.
    first_line: usize,
}

/// Cuts a YAML stream into pieces of one document each: before its `---` lines and after its
/// `...` lines. A line that starts with `---` or `...` followed by a blank or its end is always
/// a marker in YAML (no scalar may contain one at the start of a line), so no document is ever
/// cut in two.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut first_line = 0;
    let mut offset = 0;
    let is_marker = |line: &str, marker: &str| {
        line.trim_end_matches(['\n', '\r'])
            .strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t'))
    };
    for (line_number, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line, "---") && offset > start {
            chunks.push(Chunk {
                text: &text[start..offset],
                first_line,
            });
            start = offset;
            first_line = line_number;
        }
        offset += line.len();
        if is_marker(line, "...") {
            chunks.push(Chunk {
                text: &text[start..offset],
                first_line,
            });
            start = offset;
            first_line = line_number + 1;
        }
    }
    if offset > start {
        chunks.push(Chunk {
            text: &text[start..offset],
            first_line,
        });
    }
    chunks
}

/// What a document says it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    kind: Option<String>,
    api_version: Option<String>,
}

/// The document of one piece, if it holds one; `number` counts documents in the file so far.
fn parse_chunk(
    path: &Path,
    chunk: &Chunk<'_>,
    number: &mut usize,
) -> Result<Vec<Object>, ManifestError> {
    let fail = |location: String, reason: String| ManifestError::Document {
        file: path.to_owned(),
        document: *number + 1,
        location,
        reason,
    };
    // Every error of the parser names the line of the piece: move it to the file's.
    let parse_failed = |prefix: &str, error: serde_saphyr::Error| {
        let fault = YamlFault::from(&error);
        let location = fault
            .at
            .map(|(line, column)| format!(" (line {}, column {column})", line + chunk.first_line))
            .unwrap_or_default();
        fail(location, format!("{prefix}{}", fault.reason))
    };
    // Empty documents (a trailing `---`, only comments) are skipped, as kubectl does.
    let metas: Vec<TypeMeta> =
        serde_saphyr::from_multiple(chunk.text).map_err(|e| parse_failed("", e))?;
    let Some(meta) = metas.into_iter().next() else {
        return Ok(Vec::new());
    };
    let kind = meta
        .kind
        .ok_or_else(|| fail(String::new(), "no `kind`".to_owned()))?;
    fn one<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, serde_saphyr::Error> {
        let all: Vec<T> = serde_saphyr::from_multiple(text)?;
        // The piece parsed to one document above, so the typed read finds the same one.
        all.into_iter()
            .next()
            .ok_or_else(|| serde::de::Error::custom("the document vanished on a second read"))
    }
    let object = match kind.as_str() {
        "Namespace" => one(chunk.text).map(|o| Object::Namespace(Arc::new(o))),
        "Pod" => one(chunk.text).map(|o| Object::Pod(Arc::new(o))),
        "Service" => one(chunk.text).map(|o| Object::Service(Arc::new(o))),
        "EndpointSlice" => one(chunk.text).map(|o| Object::EndpointSlice(Arc::new(o))),
        "MeshPolicy" | "MeshAuthentication" => {
            let api_version = meta.api_version;
            if api_version.as_deref() != Some(WEFT_API_VERSION) {
                return Err(fail(
                    String::new(),
                    format!("{kind} of apiVersion {api_version:?}: Weft reads {WEFT_API_VERSION}"),
                ));
            }
            if kind == "MeshPolicy" {
                one(chunk.text).map(|o| Object::MeshPolicy(Arc::new(o)))
            } else {
                one(chunk.text).map(|o| Object::MeshAuthentication(Arc::new(o)))
            }
        }
        other => {
            tracing::debug!(file = %path.display(), document = *number + 1, kind = other, "kind not followed; skipped");
            *number += 1;
            return Ok(Vec::new());
        }
    };
    let object = object.map_err(|e| parse_failed(&format!("{kind}: "), e))?;
    *number += 1;
    Ok(vec![object])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels:\n    weft.dev/mesh: enabled\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: apps\nspec:\n  containers: [{name: web, image: web}]\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: ignored\n---\n";

    #[test]
    fn reads_multi_document_files_and_skips_other_kinds() {
        let objects = parse_documents(Path::new("a.yaml"), GOOD).unwrap();
        assert_eq!(objects.len(), 2);
        assert!(
            matches!(&objects[0], Object::Namespace(ns) if ns.metadata.name.as_deref() == Some("apps"))
        );
        assert!(
            matches!(&objects[1], Object::Pod(p) if p.metadata.namespace.as_deref() == Some("apps"))
        );
    }

    #[test]
    fn scalars_are_read_as_the_type_asks() {
        // No untyped value in between: a label `yes` or `0x10` is the string written.
        let text =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {x: yes, y: 0x10}}\n";
        let objects = parse_documents(Path::new("a.yaml"), text).unwrap();
        let Object::Namespace(ns) = &objects[0] else {
            panic!("{objects:?}")
        };
        let labels = ns.metadata.labels.as_ref().unwrap();
        assert_eq!(
            (labels["x"].as_str(), labels["y"].as_str()),
            ("yes", "0x10")
        );
    }

    #[test]
    fn a_bad_document_names_file_document_and_reason() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 7}\n";
        let error = parse_documents(Path::new("b.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("b.yaml: document 2"), "{error}");
        assert!(
            error.contains("Pod") && error.contains("sequence"),
            "{error}"
        );
        let error = parse_documents(Path::new("c.yaml"), "kind: [unclosed\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("c.yaml: document 1 (line"), "{error}");
        let error = parse_documents(Path::new("d.yaml"), "metadata: {name: x}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no `kind`"), "{error}");
    }

    #[test]
    fn documents_are_cut_only_at_markers_and_errors_name_the_line_of_the_file() {
        // `---` inside an indented block scalar is text, `--- {...}` starts a document with
        // content on its own line, and `...` ends a document (a bare one may follow).
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  annotations:\n    note: |\n      ---\n      not a marker\n--- {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n...\napiVersion: v1\nkind: Namespace\nmetadata: {name: d}\n---\n# only a comment\n";
        let objects = parse_documents(Path::new("m.yaml"), text).unwrap();
        let names: Vec<_> = objects
            .iter()
            .map(|o| match o {
                Object::Namespace(ns) => ns.metadata.name.clone().unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let Object::Namespace(a) = &objects[0] else {
            unreachable!()
        };
        assert_eq!(
            a.metadata.annotations.as_ref().unwrap()["note"],
            "---\nnot a marker\n"
        );

        let broken = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\napiVersion: v1\nkind: Pod\nmetadata: [unclosed\n";
        let error = parse_documents(Path::new("m.yaml"), broken)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error, "m.yaml: document 3 (line 11, column 11): unclosed bracket '['",
            "the parser's location is the file's, not the piece's"
        );
    }

    #[test]
    fn a_changed_document_gives_what_a_fresh_read_gives() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        let many = |label: &str| {
            let mut text = format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: apps, labels: {{weft.dev/mesh: {label}}}}}\n"
            );
            for i in 0..50 {
                text.push_str(&format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: apps}}\nspec: {{containers: [{{name: c, image: c}}]}}\n"
                ));
            }
            text
        };
        std::fs::write(&file, many("enabled")).unwrap();
        let mut folder = ManifestFolder::new(dir.path());
        assert_eq!(folder.reload(), (true, vec![]));
        std::fs::write(&file, many("disabled")).unwrap();
        assert_eq!(folder.reload(), (true, vec![]));
        let fresh = parse_documents(&file, &many("disabled")).unwrap();
        let mut expected = ClusterObjects::default();
        for object in fresh {
            expected.insert(object);
        }
        assert_eq!(folder.objects(), expected);
        assert_eq!(
            folder.objects().namespaces["apps"]
                .metadata
                .labels
                .as_ref()
                .unwrap()["weft.dev/mesh"],
            "disabled"
        );

        // A later document breaking is numbered as a fresh read numbers it, though the
        // documents before it were not parsed again.
        let mut broken = many("enabled");
        broken.push_str("---\nkind: Pod\nmetadata: [unclosed\n");
        std::fs::write(&file, &broken).unwrap();
        let (changed, errors) = folder.reload();
        assert!(!changed);
        assert_eq!(
            errors[0],
            parse_documents(&file, &broken).unwrap_err(),
            "same error as a fresh read"
        );
        assert!(
            errors[0]
                .to_string()
                .contains("document 52 (line 256, column 11)"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_file_that_stays_broken_is_reported_once_and_listed_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "kind: Pod\nmetadata: [oops\n").unwrap();
        let mut folder = ManifestFolder::new(dir.path());
        let (_, errors) = folder.reload();
        assert_eq!(errors.len(), 1);
        assert_eq!(folder.reload(), (false, vec![]), "reported once");
        assert_eq!(folder.errors(), errors, "still failing");
        std::fs::write(
            &file,
            "kind: Pod\nmetadata: {name: x}\nspec: {containers: 7}\n",
        )
        .unwrap();
        assert_eq!(folder.reload().1.len(), 1, "a different failure is new");
        std::fs::write(&file, GOOD).unwrap();
        assert_eq!(folder.reload(), (true, vec![]));
        assert!(folder.errors().is_empty(), "fixed");
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, "kind: [x\n").unwrap();
        folder.reload();
        std::fs::remove_file(&file).unwrap();
        folder.reload();
        assert!(folder.errors().is_empty(), "a removed file's failure goes");
    }

    #[test]
    fn files_and_folders_other_users_could_change_are_refused_keeping_the_last_good_objects() {
        use std::os::unix::fs::PermissionsExt;
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, GOOD).unwrap();
        chmod(&file, 0o644);
        let mut folder = ManifestFolder::new(dir.path());
        assert_eq!(folder.reload(), (true, vec![]));
        let objects = folder.objects();
        chmod(&file, 0o666);
        // Touched by "another user": not read; the objects it held stay.
        std::fs::write(&file, GOOD.replace("name: web", "name: evil")).unwrap();
        let (changed, errors) = folder.reload();
        assert!(!changed);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .contains("writable by other users (mode 0666)"),
            "{}",
            errors[0]
        );
        assert_eq!(folder.objects(), objects);
        chmod(&file, 0o644);
        assert!(folder.reload().0, "read again once it is private");
        chmod(dir.path(), 0o777);
        let (_, errors) = folder.reload();
        assert!(
            errors[0]
                .to_string()
                .contains("writable by other users (mode 0777)"),
            "{}",
            errors[0]
        );
        chmod(dir.path(), 0o700);
    }

    #[tokio::test]
    async fn the_watch_wakes_on_a_file_written_or_renamed_in_and_not_before() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let mut folder = ManifestFolder::new(dir.path());
        folder.watch().unwrap();
        folder.reload();
        async fn woke(folder: &ManifestFolder) -> bool {
            tokio::time::timeout(Duration::from_millis(300), folder.changed())
                .await
                .is_ok()
        }
        // One action raises several events (create, close), delivered by the watch's own
        // thread: let them all arrive and take them before the next action.
        async fn settle(folder: &ManifestFolder) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            while tokio::time::timeout(Duration::from_millis(20), folder.changed())
                .await
                .is_ok()
            {}
        }
        assert!(!woke(&folder).await, "nothing happened");
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        assert!(woke(&folder).await, "written and closed");
        assert!(folder.reload().0);
        settle(&folder).await;
        // A half-written file raises nothing until it is closed.
        let mut open = std::fs::File::create(dir.path().join("b.yaml")).unwrap();
        assert!(woke(&folder).await, "created");
        settle(&folder).await;
        std::io::Write::write_all(&mut open, b"kind: Namespace\n").unwrap();
        assert!(!woke(&folder).await, "a write alone does not wake");
        drop(open);
        assert!(woke(&folder).await, "closed");
        folder.reload();
        let tmp = dir.path().join("c.tmp");
        std::fs::write(&tmp, GOOD.replace("apps", "renamed")).unwrap();
        settle(&folder).await;
        std::fs::rename(&tmp, dir.path().join("c.yaml")).unwrap();
        assert!(woke(&folder).await, "renamed in");
        assert!(folder.reload().0);
        assert!(folder.objects().namespaces.contains_key("renamed"));
    }

    #[test]
    fn a_file_that_breaks_keeps_its_last_good_objects_and_the_rest_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let mut folder = ManifestFolder::new(dir.path());
        assert_eq!(folder.reload(), (true, vec![]));
        assert_eq!(folder.reload(), (false, vec![]), "nothing new");
        assert_eq!(folder.objects().namespaces.len(), 2);
        assert_eq!(folder.objects().pods.len(), 1);

        std::fs::write(dir.path().join("a.yaml"), "kind: Pod\nmetadata: [oops\n").unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: renamed}\n",
        )
        .unwrap();
        let (changed, errors) = folder.reload();
        assert!(changed, "b.yml changed");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("a.yaml: document 1"));
        let objects = folder.objects();
        assert!(
            objects.namespaces.contains_key("apps"),
            "a.yaml's last good objects stay"
        );
        assert!(
            objects.namespaces.contains_key("renamed") && !objects.namespaces.contains_key("other")
        );

        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(folder.reload(), (true, vec![]));
        assert!(
            folder.objects().pods.is_empty(),
            "a removed file takes its objects"
        );
    }
}
