"""Project storage: one SQLite database (WAL) in the data folder.

Tables: projects, labels (the label set of a project), images (files kept under <data>/images by
content hash), annotations (COCO RLE, who/when, a version for optimistic updates). Every write is one
transaction that is committed before the caller returns, so an API answer means the write is on disk.

synchronous=FULL: in WAL mode NORMAL already survives a killed process, but a power loss could drop
the last commits; annotations are human work, and one fsync per accepted object is cheap at the rate
people annotate, so FULL makes "acknowledged" mean "durable" in every case.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0  -- bumped by every change in the project (tabs poll it)
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    color TEXT NOT NULL,
    UNIQUE (project_id, name)
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    file_name TEXT NOT NULL,      -- the name shown and exported (no directories)
    stored_name TEXT NOT NULL,    -- <sha256>.<ext> under <data>/images
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    UNIQUE (project_id, sha256)
);
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    label_id INTEGER REFERENCES labels(id) ON DELETE SET NULL,
    rle_counts TEXT NOT NULL,     -- COCO compressed RLE string, column-major, size = image (h, w)
    area INTEGER NOT NULL,
    bbox TEXT NOT NULL,           -- JSON [x, y, w, h]
    score REAL,                   -- predicted IoU of the chosen candidate, if any
    source TEXT NOT NULL,         -- click | box | brush | proposal | import
    meta TEXT NOT NULL DEFAULT '{}',  -- JSON: prompt points/box, stability score, crop box (SA-1B fields)
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS annotations_by_image ON annotations(image_id);
CREATE INDEX IF NOT EXISTS images_by_project ON images(project_id);
"""

LABEL_COLORS = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075",
)


class NotFound(LookupError):
    """A project, image, label or annotation id that does not exist."""


def _check_id(kind: str, value: Any) -> None:
    """An id SQLite cannot even hold (beyond 64 bits) is an id that does not exist, not a server error."""
    if not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise NotFound(f"{kind} {value} does not exist")


class Conflict(RuntimeError):
    """A write that contradicts the stored state (duplicate name, stale version)."""


class Storage:
    """Thread-safe access to the project database (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly one call.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot put {self.path} in WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        # executescript commits on its own, so the schema is created outside _tx (all IF NOT EXISTS).
        with self._lock:
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> List[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def integrity_check(self) -> str:
        return str(self._query("PRAGMA integrity_check")[0][0])

    @staticmethod
    def _bump(db: sqlite3.Connection, project_id: int) -> None:
        db.execute("UPDATE projects SET revision = revision + 1 WHERE id = ?", (project_id,))

    # ------------------------------------------------------------ projects

    def create_project(self, name: str, user: str) -> Dict[str, Any]:
        try:
            with self._tx() as db:
                cur = db.execute(
                    "INSERT INTO projects (name, created_at, created_by) VALUES (?, ?, ?)", (name, time.time(), user)
                )
                project_id = int(cur.lastrowid)
        except sqlite3.IntegrityError:
            raise Conflict(f"a project named {name!r} already exists") from None
        return self.project(project_id)

    def _project_row(self, row: sqlite3.Row) -> Dict[str, Any]:
        counts = self._query(
            "SELECT (SELECT COUNT(*) FROM images WHERE project_id = ?),"
            " (SELECT COUNT(*) FROM annotations WHERE project_id = ?)",
            (row["id"], row["id"]),
        )[0]
        return {
            "id": row["id"],
            "name": row["name"],
            "created_at": row["created_at"],
            "created_by": row["created_by"],
            "revision": row["revision"],
            "num_images": counts[0],
            "num_annotations": counts[1],
        }

    def projects(self) -> List[Dict[str, Any]]:
        return [self._project_row(r) for r in self._query("SELECT * FROM projects ORDER BY id")]

    def project(self, project_id: int) -> Dict[str, Any]:
        _check_id("project", project_id)
        rows = self._query("SELECT * FROM projects WHERE id = ?", (project_id,))
        if not rows:
            raise NotFound(f"project {project_id} does not exist")
        return self._project_row(rows[0])

    def revision(self, project_id: int) -> int:
        _check_id("project", project_id)
        rows = self._query("SELECT revision FROM projects WHERE id = ?", (project_id,))
        if not rows:
            raise NotFound(f"project {project_id} does not exist")
        return int(rows[0][0])

    # ------------------------------------------------------------ labels

    def labels(self, project_id: int) -> List[Dict[str, Any]]:
        self.project(project_id)
        rows = self._query("SELECT id, name, color FROM labels WHERE project_id = ? ORDER BY id", (project_id,))
        return [dict(r) for r in rows]

    def add_label(self, project_id: int, name: str, color: Optional[str] = None) -> Dict[str, Any]:
        self.project(project_id)
        with self._tx() as db:
            existing = db.execute(
                "SELECT id, name, color FROM labels WHERE project_id = ? AND name = ?", (project_id, name)
            ).fetchone()
            if existing is not None:
                return dict(existing)
            if color is None:
                n = db.execute("SELECT COUNT(*) FROM labels WHERE project_id = ?", (project_id,)).fetchone()[0]
                color = LABEL_COLORS[n % len(LABEL_COLORS)]
            cur = db.execute(
                "INSERT INTO labels (project_id, name, color) VALUES (?, ?, ?)", (project_id, name, color)
            )
            self._bump(db, project_id)
            return {"id": int(cur.lastrowid), "name": name, "color": color}

    def _check_label(self, db: sqlite3.Connection, project_id: int, label_id: Optional[int]) -> None:
        if label_id is None:
            return
        _check_id("label", label_id)
        row = db.execute("SELECT project_id FROM labels WHERE id = ?", (label_id,)).fetchone()
        if row is None or row[0] != project_id:
            raise NotFound(f"label {label_id} does not exist in project {project_id}")

    # ------------------------------------------------------------ images

    def add_image(
        self, project_id: int, file_name: str, stored_name: str, sha256: str, width: int, height: int, user: str
    ) -> tuple:
        """Insert an image; returns (image, created). The same content twice in a project is one image."""
        self.project(project_id)
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM images WHERE project_id = ? AND sha256 = ?", (project_id, sha256)
            ).fetchone()
            if row is not None:
                image_id, created = int(row[0]), False
            else:
                cur = db.execute(
                    "INSERT INTO images (project_id, file_name, stored_name, sha256, width, height, created_at,"
                    " created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (project_id, file_name, stored_name, sha256, width, height, time.time(), user),
                )
                image_id, created = int(cur.lastrowid), True
                self._bump(db, project_id)
        return self.image(image_id), created

    @staticmethod
    def _image_row(row: sqlite3.Row) -> Dict[str, Any]:
        out = {k: row[k] for k in ("id", "project_id", "file_name", "stored_name", "sha256", "width", "height")}
        out["created_at"], out["created_by"] = row["created_at"], row["created_by"]
        if "num_annotations" in row.keys():
            out["num_annotations"] = row["num_annotations"]
        return out

    def images(self, project_id: int) -> List[Dict[str, Any]]:
        self.project(project_id)
        rows = self._query(
            "SELECT images.*, (SELECT COUNT(*) FROM annotations a WHERE a.image_id = images.id) AS num_annotations"
            " FROM images WHERE project_id = ? ORDER BY id",
            (project_id,),
        )
        return [self._image_row(r) for r in rows]

    def image(self, image_id: int) -> Dict[str, Any]:
        _check_id("image", image_id)
        rows = self._query(
            "SELECT images.*, (SELECT COUNT(*) FROM annotations a WHERE a.image_id = images.id) AS num_annotations"
            " FROM images WHERE id = ?",
            (image_id,),
        )
        if not rows:
            raise NotFound(f"image {image_id} does not exist")
        return self._image_row(rows[0])

    def image_by_file_name(self, project_id: int, file_name: str) -> Optional[Dict[str, Any]]:
        rows = self._query(
            "SELECT * FROM images WHERE project_id = ? AND file_name = ? ORDER BY id LIMIT 1", (project_id, file_name)
        )
        return self._image_row(rows[0]) if rows else None

    # ------------------------------------------------------------ annotations

    @staticmethod
    def _annotation_row(row: sqlite3.Row) -> Dict[str, Any]:
        return {
            "id": row["id"],
            "project_id": row["project_id"],
            "image_id": row["image_id"],
            "label_id": row["label_id"],
            "segmentation": {"size": [row["height"], row["width"]], "counts": row["rle_counts"]},
            "area": row["area"],
            "bbox": json.loads(row["bbox"]),
            "score": row["score"],
            "source": row["source"],
            "meta": json.loads(row["meta"]),
            "created_by": row["created_by"],
            "created_at": row["created_at"],
            "updated_by": row["updated_by"],
            "updated_at": row["updated_at"],
            "version": row["version"],
        }

    _ANNOTATION_SELECT = (
        "SELECT annotations.*, images.width AS width, images.height AS height FROM annotations"
        " JOIN images ON images.id = annotations.image_id"
    )

    def annotations(self, image_id: int) -> List[Dict[str, Any]]:
        self.image(image_id)
        rows = self._query(self._ANNOTATION_SELECT + " WHERE annotations.image_id = ? ORDER BY annotations.id", (image_id,))
        return [self._annotation_row(r) for r in rows]

    def project_annotations(self, project_id: int) -> List[Dict[str, Any]]:
        rows = self._query(
            self._ANNOTATION_SELECT + " WHERE annotations.project_id = ? ORDER BY annotations.id", (project_id,)
        )
        return [self._annotation_row(r) for r in rows]

    def annotation(self, annotation_id: int) -> Dict[str, Any]:
        _check_id("annotation", annotation_id)
        rows = self._query(self._ANNOTATION_SELECT + " WHERE annotations.id = ?", (annotation_id,))
        if not rows:
            raise NotFound(f"annotation {annotation_id} does not exist")
        return self._annotation_row(rows[0])

    def add_annotations(self, image_id: int, items: Sequence[Dict[str, Any]], user: str) -> List[Dict[str, Any]]:
        """Insert several annotations of one image in one transaction (all or nothing).

        Each item: label_id, rle_counts, area, bbox, score, source, meta (already validated by the caller).
        """
        image = self.image(image_id)
        project_id = image["project_id"]
        now = time.time()
        ids = []
        with self._tx() as db:
            for item in items:
                self._check_label(db, project_id, item.get("label_id"))
                cur = db.execute(
                    "INSERT INTO annotations (project_id, image_id, label_id, rle_counts, area, bbox, score, source, meta,"
                    " created_by, created_at, updated_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        project_id, image_id, item.get("label_id"), item["rle_counts"], int(item["area"]),
                        json.dumps([float(v) for v in item["bbox"]]), item.get("score"), item["source"],
                        json.dumps(item.get("meta") or {}), user, now, user, now,
                    ),
                )
                ids.append(int(cur.lastrowid))
            if ids:
                self._bump(db, project_id)
        return [self.annotation(i) for i in ids]

    def update_annotation(
        self, annotation_id: int, changes: Dict[str, Any], user: str, expected_version: Optional[int] = None
    ) -> Dict[str, Any]:
        """Change label and/or mask; `expected_version` guards against overwriting another tab's edit."""
        current = self.annotation(annotation_id)
        allowed = {"label_id", "rle_counts", "area", "bbox", "score", "source", "meta"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}")
        with self._tx() as db:
            row = db.execute("SELECT version FROM annotations WHERE id = ?", (annotation_id,)).fetchone()
            if row is None:
                raise NotFound(f"annotation {annotation_id} does not exist")
            if expected_version is not None and int(row[0]) != int(expected_version):
                raise Conflict(
                    f"annotation {annotation_id} was changed elsewhere (version {row[0]}, you had {expected_version})"
                )
            if "label_id" in changes:
                self._check_label(db, current["project_id"], changes["label_id"])
            values = dict(changes)
            if "bbox" in values:
                values["bbox"] = json.dumps([float(v) for v in values["bbox"]])
            if "meta" in values:
                values["meta"] = json.dumps(values["meta"] or {})
            sets = ", ".join(f"{k} = ?" for k in values)
            db.execute(
                f"UPDATE annotations SET {sets}{', ' if sets else ''}updated_by = ?, updated_at = ?,"
                " version = version + 1 WHERE id = ?",
                (*values.values(), user, time.time(), annotation_id),
            )
            self._bump(db, current["project_id"])
        return self.annotation(annotation_id)

    def delete_annotation(self, annotation_id: int) -> Dict[str, Any]:
        current = self.annotation(annotation_id)
        with self._tx() as db:
            cur = db.execute("DELETE FROM annotations WHERE id = ?", (annotation_id,))
            if cur.rowcount != 1:
                raise NotFound(f"annotation {annotation_id} does not exist")
            self._bump(db, current["project_id"])
        return current
