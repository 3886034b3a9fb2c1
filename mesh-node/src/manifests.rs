//! The local manifest folder: the same Kubernetes YAML a cluster would hold (multi-document
//! files of Namespace, Pod and Service), read with the same types. A file that does not parse
//! is reported with its file, document and reason and ignored, keeping what it held before;
//! the other files keep working.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cluster::{ClusterObjects, Object};

/// Why one manifest file was ignored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
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
}

/// The folder's objects, file by file, with the last good content of each file.
#[derive(Debug, Default)]
pub struct ManifestFolder {
    folder: PathBuf,
    /// Last good objects of each file, and the text they came from.
    files: BTreeMap<PathBuf, (String, Vec<Object>)>,
}

impl ManifestFolder {
    pub fn new(folder: &Path) -> Self {
        ManifestFolder {
            folder: folder.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Reads the folder again: new and changed files are parsed (a file that fails keeps its
    /// last good objects), removed files drop their objects. Returns whether any file's
    /// objects changed, and the errors of this pass.
    pub fn reload(&mut self) -> (bool, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let before = self.files.len();
        let mut changed = false;
        let listed = match list_yaml(&self.folder) {
            Ok(listed) => listed,
            Err(reason) => {
                errors.push(ManifestError::Folder {
                    folder: self.folder.clone(),
                    reason,
                });
                return (false, errors);
            }
        };
        self.files.retain(|path, _| listed.contains(path));
        changed |= self.files.len() != before;
        for path in listed {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(ManifestError::Read {
                        file: path,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            if self.files.get(&path).is_some_and(|(old, _)| *old == text) {
                continue;
            }
            match parse_documents(&path, &text) {
                Ok(objects) => {
                    self.files.insert(path, (text, objects));
                    changed = true;
                }
                Err(error) => errors.push(error),
            }
        }
        (changed, errors)
    }

    /// Every object of every file, later files winning on the same name.
    pub fn objects(&self) -> ClusterObjects {
        let mut all = ClusterObjects::default();
        for (_, objects) in self.files.values() {
            for object in objects {
                all.insert(object.clone());
            }
        }
        all
    }
}

/// The `.yaml` and `.yml` files of `folder`, sorted, not recursing.
fn list_yaml(folder: &Path) -> Result<Vec<PathBuf>, String> {
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
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |location: String, reason: String| ManifestError::Document {
            file: path.to_owned(),
            document: index + 1,
            location,
            reason,
        };
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| fail(location_of(&e), e.to_string()))?;
        if value.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| fail(String::new(), "no `kind`".to_owned()))?
            .to_owned();
        let object = match kind.as_str() {
            "Namespace" => serde_yaml::from_value(value).map(|o| Object::Namespace(Box::new(o))),
            "Pod" => serde_yaml::from_value(value).map(|o| Object::Pod(Box::new(o))),
            "Service" => serde_yaml::from_value(value).map(|o| Object::Service(Box::new(o))),
            other => {
                tracing::debug!(file = %path.display(), document = index + 1, kind = other, "kind not followed; skipped");
                continue;
            }
        };
        objects.push(object.map_err(|e| fail(String::new(), format!("{kind}: {e}")))?);
    }
    Ok(objects)
}

fn location_of(e: &serde_yaml::Error) -> String {
    e.location()
        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
        .unwrap_or_default()
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
