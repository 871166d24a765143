//! The task table: every task of the node, boxed, found by id.
//!
//! A `HashMap<Uuid, Box<Task>>` spends 24 bytes a slot, and a hash table
//! keeps up to twice the slots it fills: up to 50 bytes a task. This table
//! keeps only the box (8 bytes a slot, plus hashbrown's control byte) and
//! finds a task by the id stored inside it. Task ids are random (v4), so
//! their two halves XORed are the hash.

use hashbrown::HashTable;
use uuid::Uuid;

use super::Task;

#[derive(Default)]
pub(super) struct TaskTable {
    table: HashTable<Box<Task>>,
    /// With the journal on: the ids of the tasks changed (inserted,
    /// removed, or reached through [`TaskTable::get_mut`]) since the last
    /// [`TaskTable::take_changed`], maybe repeated.
    changed: Option<Vec<Uuid>>,
}

fn hash(id: &Uuid) -> u64 {
    // Both halves: a v4 id has fixed version and variant bits, which would
    // waste the top bits hashbrown takes its tags from.
    let (hi, lo) = id.as_u64_pair();
    hi ^ lo
}

impl TaskTable {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn get(&self, id: &Uuid) -> Option<&Task> {
        self.table.find(hash(id), |t| t.id == *id).map(|b| &**b)
    }

    /// A task to change: it is noted as changed, for the journal.
    pub fn get_mut(&mut self, id: &Uuid) -> Option<&mut Task> {
        if let Some(changed) = &mut self.changed {
            changed.push(*id);
        }
        self.get_mut_quiet(id)
    }

    /// A task whose timer bookkeeping changes (`fire_at_us`, `timed`,
    /// `in_ready`): nothing the journal records, which derives them.
    pub fn get_mut_quiet(&mut self, id: &Uuid) -> Option<&mut Task> {
        self.table
            .find_mut(hash(id), |t| t.id == *id)
            .map(|b| &mut **b)
    }

    /// Notes every change from now on.
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(Vec::new);
    }

    /// The ids of the tasks changed since the last call (maybe repeated).
    pub fn take_changed(&mut self) -> Vec<Uuid> {
        self.changed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Adds `task` under its id, replacing a task with the same id.
    pub fn insert(&mut self, task: Box<Task>) {
        let id = task.id;
        if let Some(changed) = &mut self.changed {
            changed.push(id);
        }
        match self.table.entry(hash(&id), |t| t.id == id, |t| hash(&t.id)) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = task,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(task);
            }
        }
    }

    pub fn remove(&mut self, id: &Uuid) -> Option<Box<Task>> {
        if let Some(changed) = &mut self.changed {
            changed.push(*id);
        }
        match self.table.find_entry(hash(id), |t| t.id == *id) {
            Ok(entry) => Some(entry.remove().0),
            Err(_) => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Uuid, &Task)> {
        self.table.iter().map(|t| (t.id, &**t))
    }
}

#[cfg(test)]
impl std::ops::Index<&Uuid> for TaskTable {
    type Output = Task;

    fn index(&self, id: &Uuid) -> &Task {
        match self.get(id) {
            Some(t) => t,
            None => panic!("no task {id}"),
        }
    }
}
