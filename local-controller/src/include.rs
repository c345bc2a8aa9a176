//! Include trees at the site: a fetch that brings a whole encounter.
//!
//! When a query's join group has a table with a selection of its own, of a
//! relation the network's include trees start from (a patient by name or
//! number, the patient of a visit history), and the site has no tuple of
//! its own that the selection picks, the fetch asks
//! in the same request for the tuples the tree hangs below the ones it
//! selects: the patients' visits, the visits' report lines. The extra
//! groups repeat the table's selection, one group per path of the tree
//! (`σ(p), v.pno = p.pno` and `σ(p), v.pno = p.pno, r.vno = v.vno`), so
//! the controller evaluates them over the global snapshot as of the last
//! epoch, and sends only what the site does not hold yet.
//!
//! What came is stored as one snapshot whose definition names the parents
//! by key — `p.pno IN (P), v.pno = p.pno` (when `pno` is the patient's
//! whole key), `v.pno IN (P)`, `r.vno IN (V)` — where `P` holds the keys of
//! the parents the selection picks here (copies and own tuples neither new nor changed since the last
//! refresh, which are as the global snapshot has them) and `V` the keys of
//! their children held now. Every global tuple such a definition selects
//! is at the site, so the visit-history and report queries that follow are
//! covered by the ordinary *performed* check, and the refresh re-runs the
//! definition like any other (a new visit of a patient in `P` arrives with
//! the next epoch).

use std::collections::BTreeSet;

use rusqlite::Connection;
use snaps_mapping::ir::{BinOp, ColumnRef, Expr, Range, Select, Target};
use snaps_mapping::mapping::RelationMapping;
use snaps_mapping::rewrite::{Plan, plan};
use snaps_schema::include::IncludeEdge;
use snaps_schema::{Value, sql_ident};

use crate::Result;
use crate::remote::LocalTuples;
use crate::site::{Active, result_value};
use crate::store::{CHANGED_BITS, SNAPSHOT_BIT, STATUS_COLUMN};

/// At most this many relations in one tree: a fetch must stay one
/// encounter's worth.
const MAX_NODES: usize = 8;

/// One relation of a site's include tree, in local terms.
#[derive(Debug, Clone)]
struct Node {
    /// The local relation.
    relation: String,
    /// The parent node, the parent's local key attribute and this node's
    /// local attribute holding it (`None` for the root).
    parent: Option<(usize, String, String)>,
}

/// What a fetch of one join group brings along.
pub(crate) struct Include {
    /// The tree; node 0 is the fetched table's relation.
    nodes: Vec<Node>,
    /// The fetched table's variable and its local selection.
    root_var: String,
    root_selection: Vec<Expr>,
    /// The groups fetched with the query, one per non-root node (the path
    /// from the root to it).
    pub(crate) plan: Plan,
}

/// The local attribute of `rm` that carries global attribute `global`
/// unconverted (so equal values here are equal values there).
fn unconverted<'a>(rm: &'a RelationMapping, global: &str) -> Option<&'a str> {
    let [part] = rm.parts.as_slice() else {
        return None;
    };
    part.attrs
        .iter()
        .find(|a| a.global == global && a.to_global.is_none() && a.to_local.is_none())
        .map(|a| a.local.as_str())
}

/// The include tree below local relation `root`, in local terms: every
/// edge whose relations the site maps one-to-one, with the attributes
/// unconverted. `None` when no edge applies.
fn tree(mapping: &Active, edges: &[IncludeEdge], root: &str) -> Option<Vec<Node>> {
    let rm = mapping.relation(root)?;
    let [part] = rm.parts.as_slice() else {
        return None;
    };
    let mut nodes = vec![Node {
        relation: root.to_string(),
        parent: None,
    }];
    let mut globals = vec![part.global.clone()];
    let mut i = 0;
    while i < nodes.len() {
        let at = globals[i].clone();
        for e in edges.iter().filter(|e| e.parent == at) {
            if nodes.len() == MAX_NODES {
                break;
            }
            let Some(parent_rm) = mapping.relation(&nodes[i].relation) else {
                continue;
            };
            let Some(parent_attr) = unconverted(parent_rm, &e.parent_attribute) else {
                continue;
            };
            // The one local relation holding the child relation.
            let mut holders = mapping
                .relations()
                .filter(|r| matches!(r.parts.as_slice(), [p] if p.global == e.child));
            let (Some(child_rm), None) = (holders.next(), holders.next()) else {
                continue;
            };
            let Some(child_attr) = unconverted(child_rm, &e.child_attribute) else {
                continue;
            };
            nodes.push(Node {
                relation: child_rm.local.name.clone(),
                parent: Some((i, parent_attr.to_string(), child_attr.to_string())),
            });
            globals.push(e.child.clone());
        }
        i += 1;
    }
    (nodes.len() > 1).then_some(nodes)
}

/// The nodes from the root to `n`, root first.
fn path(nodes: &[Node], n: usize) -> Vec<usize> {
    let mut out = vec![n];
    let mut at = n;
    while let Some((p, ..)) = &nodes[at].parent {
        out.push(*p);
        at = *p;
    }
    out.reverse();
    out
}

/// `selection` over `from` rewritten over `to`.
fn renamed(selection: &[Expr], from: &str, to: &str) -> Vec<Expr> {
    selection
        .iter()
        .map(|e| {
            e.map_columns(&mut |c| {
                Expr::Column(if c.var.as_deref() == Some(from) {
                    ColumnRef::new(to, &c.attr)
                } else {
                    c.clone()
                })
            })
        })
        .collect()
}

/// The variable of node `n` at depth `d` of the path group for `n`.
fn path_var(n: usize, d: usize) -> String {
    format!("snaps_inc{n}_{d}")
}

/// What a fetch of `plan` brings along: for the first table with a
/// selection of its own, of a relation an include tree starts from.
/// `None` when nothing applies (or the extra groups cannot be mapped).
pub(crate) fn include_for(
    mapping: &Active,
    catalog: &snaps_schema::Catalog,
    edges: &[IncludeEdge],
    main: &Plan,
) -> Option<Include> {
    if edges.is_empty() {
        return None;
    }
    let query = main.query.as_ref()?;
    // The table the tree hangs from: one with a selection of its own, in
    // the first group that has one (a patient by name, or the patient of a
    // visit history, whose report lines then come along). What the tree
    // brings follows that selection alone, as if the patients it picks had
    // been looked up: other tables of the group may narrow the answer, not
    // the encounter.
    let (table, nodes) = query.groups.iter().find_map(|g| {
        g.tables.iter().find_map(|t| {
            // A fetch of a whole relation brings no tree along: that would
            // be everyone's visits.
            if t.outer || t.local_selection.is_empty() {
                return None;
            }
            Some((t, tree(mapping, edges, &t.local_relation)?))
        })
    })?;
    let mut ranges = Vec::new();
    let mut qual = Vec::new();
    for n in 1..nodes.len() {
        let p = path(&nodes, n);
        for (d, &node) in p.iter().enumerate() {
            let var = path_var(n, d);
            ranges.push(Range::new(&var, &nodes[node].relation));
            match &nodes[node].parent {
                None => qual.extend(renamed(&table.local_selection, &table.local_var, &var)),
                Some((_, parent_attr, attr)) => qual.push(Expr::binary(
                    BinOp::Eq,
                    Expr::col(&var, attr),
                    Expr::col(&path_var(n, d - 1), parent_attr),
                )),
            }
        }
    }
    let select = Select {
        targets: vec![Target::All(None)],
        ranges,
        qual: Expr::conjunction(qual),
        ..Select::default()
    };
    let planned = match plan(&select, catalog, mapping) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "include tree not planned");
            return None;
        }
    };
    let mapped_all = planned.dropped.is_empty()
        && planned
            .query
            .as_ref()
            .is_some_and(|q| q.groups.len() == nodes.len() - 1);
    mapped_all.then(|| Include {
        nodes,
        root_var: table.local_var.clone(),
        root_selection: table.local_selection.clone(),
        plan: planned,
    })
}

/// What to store of an include fetch: the key-based query that claims it,
/// and the tuples renamed to that query's variables.
pub(crate) struct Claim {
    /// The definition's query (stored, and re-run at every refresh).
    pub(crate) select: Select,
    /// Its text, as snapshot listings show it.
    pub(crate) text: String,
    /// Its plan.
    pub(crate) plan: Plan,
    /// The fetched tuples, under the query's variables.
    pub(crate) tuples: Vec<LocalTuples>,
    /// Whether every fetched tuple found a place in the query (if not,
    /// the controller believes the site holds tuples it did not store).
    pub(crate) complete: bool,
}

impl Include {
    /// Whether the tree is worth bringing: the selection picks none of the
    /// site's own tuples. An encounter with one of the site's own patients
    /// (a lookup by a name the summaries say may be held elsewhere too)
    /// does not need the namesakes' whole records; the query's own fetch
    /// still brings the namesakes.
    pub(crate) fn for_others(&self, conn: &Connection) -> Result<bool> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 {} AND ({}.{STATUS_COLUMN} & {SNAPSHOT_BIT}) = 0)",
            self.root_from(),
            sql_ident(&self.root_var),
        );
        let own: bool = conn.prepare_cached(&sql)?.query_row([], |r| r.get(0))?;
        Ok(!own)
    }

    /// `FROM root AS var WHERE <the fetched table's selection>`.
    fn root_from(&self) -> String {
        let conds: Vec<String> = self
            .root_selection
            .iter()
            .map(|e| format!("({e})"))
            .collect();
        format!(
            "FROM {} AS {} WHERE {}",
            sql_ident(&self.nodes[0].relation),
            sql_ident(&self.root_var),
            conds.join(" AND ")
        )
    }

    /// The key-based query claiming what `fetched` brought (after the
    /// main group's tuples were stored): `None` when the selection picks
    /// no parent here that is as the global snapshot has it.
    pub(crate) fn claim(
        &self,
        conn: &Connection,
        mapping: &Active,
        catalog: &snaps_schema::Catalog,
        fetched: Vec<LocalTuples>,
    ) -> Result<Option<Claim>> {
        let nodes = &self.nodes;
        // Which node each fetched variable stands for.
        let node_of = |var: &str| -> Option<usize> {
            (1..nodes.len()).find_map(|n| {
                let p = path(nodes, n);
                (0..p.len()).find(|&d| path_var(n, d) == var).map(|d| p[d])
            })
        };
        // keys[n]: the values of node n's key (the attribute its children
        // hold) for the tuples of n the definition claims.
        let mut keys: Vec<BTreeSet<Value>> = vec![BTreeSet::new(); nodes.len()];
        let child_key = |n: usize| -> Option<&str> {
            nodes.iter().find_map(|c| match &c.parent {
                Some((p, parent_attr, _)) if *p == n => Some(parent_attr.as_str()),
                _ => None,
            })
        };
        if let Some(key) = child_key(0) {
            let sql = format!(
                "SELECT {v}.{k} {from} AND ({v}.{STATUS_COLUMN} & {CHANGED_BITS}) = 0",
                v = sql_ident(&self.root_var),
                k = sql_ident(key),
                from = self.root_from(),
            );
            keys[0] = values(conn, &sql)?;
        }
        keys[0].remove(&Value::Null);
        if keys[0].is_empty() {
            return Ok(None);
        }
        for n in 1..nodes.len() {
            let (Some((p, _, attr)), Some(key)) = (&nodes[n].parent, child_key(n)) else {
                continue;
            };
            if keys[*p].is_empty() {
                continue;
            }
            let rel = catalog.relation(&nodes[n].relation);
            let (Some(ai), Some(ki)) = (
                rel.and_then(|r| r.position(attr)),
                rel.and_then(|r| r.position(key)),
            ) else {
                continue;
            };
            let sql = format!(
                "SELECT {k} FROM {r} WHERE {a} IN ({list}) AND ({STATUS_COLUMN} & {CHANGED_BITS}) = 0",
                k = sql_ident(key),
                r = sql_ident(&nodes[n].relation),
                a = sql_ident(attr),
                list = in_list(&keys[*p]),
            );
            let mut found = values(conn, &sql)?;
            for lt in fetched
                .iter()
                .filter(|lt| node_of(&lt.local_var) == Some(n))
            {
                for (_, values) in &lt.tuples {
                    if values.get(ai).is_some_and(|v| keys[*p].contains(v))
                        && let Some(k) = values.get(ki)
                    {
                        found.insert(k.clone());
                    }
                }
            }
            found.remove(&Value::Null);
            keys[n] = found;
        }
        // The query: per child of the root, the root pinned by key with
        // the child joined (a visit history); per non-root node, its
        // tuples by their parents' keys (visits by patient, report lines by
        // visit).
        let mut ranges = Vec::new();
        let mut qual = Vec::new();
        let mut var_of: Vec<Option<String>> = vec![None; nodes.len()];
        // The root's tuples are claimed only when its attribute is its
        // whole key (no other global tuple has the same value).
        let root_key = catalog
            .relation(&nodes[0].relation)
            .map(|r| r.key.as_slice());
        for (n, node) in nodes.iter().enumerate().skip(1) {
            let Some((0, parent_attr, attr)) = &node.parent else {
                continue;
            };
            if root_key != Some(std::slice::from_ref(parent_attr)) {
                continue;
            }
            let (root, child) = (format!("snaps_root{n}"), format!("snaps_with{n}"));
            ranges.push(Range::new(&root, &nodes[0].relation));
            ranges.push(Range::new(&child, &node.relation));
            qual.push(in_expr(&root, parent_attr, &keys[0]));
            qual.push(Expr::binary(
                BinOp::Eq,
                Expr::col(&child, attr),
                Expr::col(&root, parent_attr),
            ));
            var_of[0].get_or_insert(root);
        }
        for (n, node) in nodes.iter().enumerate().skip(1) {
            let Some((p, _, attr)) = &node.parent else {
                continue;
            };
            if keys[*p].is_empty() {
                continue;
            }
            let var = format!("snaps_at{n}");
            ranges.push(Range::new(&var, &node.relation));
            qual.push(in_expr(&var, attr, &keys[*p]));
            var_of[n] = Some(var);
        }
        let select = Select {
            targets: vec![Target::All(None)],
            ranges,
            qual: Expr::conjunction(qual),
            ..Select::default()
        };
        let planned = plan(&select, catalog, mapping)?;
        let mut complete = true;
        let mut tuples = Vec::new();
        for mut lt in fetched {
            let var = node_of(&lt.local_var).and_then(|n| var_of[n].clone());
            match var {
                Some(var) => {
                    lt.local_var = var;
                    tuples.push(lt);
                }
                None => complete &= lt.tuples.is_empty(),
            }
        }
        let text = format!(
            "SELECT * FROM {} WHERE {}",
            select
                .ranges
                .iter()
                .map(|r| format!("{} AS {}", sql_ident(&r.relation), sql_ident(&r.var)))
                .collect::<Vec<_>>()
                .join(", "),
            select
                .qual
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        Ok(Some(Claim {
            select,
            text,
            plan: planned,
            tuples,
            complete,
        }))
    }
}

/// The values of a one-column query's rows.
fn values(conn: &Connection, sql: &str) -> Result<BTreeSet<Value>> {
    let mut out = BTreeSet::new();
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        out.insert(result_value(r.get_ref(0)?));
    }
    Ok(out)
}

/// SQL text of a list of constants.
fn in_list(values: &BTreeSet<Value>) -> String {
    values
        .iter()
        .map(|v| Expr::Literal(v.clone()).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `var.attr IN (values)`.
fn in_expr(var: &str, attr: &str, values: &BTreeSet<Value>) -> Expr {
    Expr::InList {
        expr: Box::new(Expr::col(var, attr)),
        list: values.iter().cloned().map(Expr::Literal).collect(),
        negated: false,
    }
}

/// The rowids of the site's tuples, own and copies, of the patient keyed
/// `key` in global relation `people` (key attribute `attribute`) and of
/// the include tree below him, per local relation (the root's first).
/// Empty when no local relation holds `people` alone with its key
/// unconverted.
pub(crate) fn patient_tree(
    conn: &Connection,
    mapping: &Active,
    edges: &[IncludeEdge],
    (people, attribute): (&str, &str),
    key: i64,
) -> Result<Vec<(String, Vec<i64>)>> {
    let mut holders = mapping
        .relations()
        .filter_map(|rm| match rm.parts.as_slice() {
            [part] if part.global == people => {
                unconverted(rm, attribute).map(|a| (rm.local.name.clone(), a.to_string()))
            }
            _ => None,
        });
    let (Some((root, attr)), None) = (holders.next(), holders.next()) else {
        return Ok(Vec::new());
    };
    let nodes = tree(mapping, edges, &root).unwrap_or_else(|| {
        vec![Node {
            relation: root.clone(),
            parent: None,
        }]
    });
    let mut rowids: Vec<Vec<i64>> = Vec::with_capacity(nodes.len());
    for n in &nodes {
        let sql = match &n.parent {
            None => format!(
                "SELECT rowid FROM {} WHERE {} = {key}",
                sql_ident(&n.relation),
                sql_ident(&attr)
            ),
            Some((p, parent_attr, child_attr)) => format!(
                "SELECT rowid FROM {} WHERE {} IN (SELECT {} FROM {} WHERE rowid IN ({}))",
                sql_ident(&n.relation),
                sql_ident(child_attr),
                sql_ident(parent_attr),
                sql_ident(&nodes[*p].relation),
                rowids[*p]
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut stmt = conn.prepare(&sql)?;
        let ids = stmt
            .query_map([], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rowids.push(ids);
    }
    let mut out: Vec<(String, Vec<i64>)> = Vec::new();
    for (n, ids) in nodes.into_iter().zip(rowids) {
        match out.iter_mut().find(|(r, _)| *r == n.relation) {
            Some((_, held)) => held.extend(ids),
            None => out.push((n.relation, ids)),
        }
    }
    Ok(out)
}
