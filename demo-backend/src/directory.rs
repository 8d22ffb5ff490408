//! The stand-in's demo data: teams and tasks per user, derived from the name alone so
//! every run (and every replica) answers the same. Every user is in the shared team
//! `demo`, so any two demo users can talk on `team:demo`, and has a personal team.

use serde_json::{Value, json};

use crate::user::UserName;

/// The team everybody is in.
pub const SHARED_TEAM_ID: &str = "demo";
pub const SHARED_TEAM_NAME: &str = "Demo team";
/// Tasks listed per user: enough to show a list, few enough to read.
pub const TASKS_PER_USER: usize = 3;

/// Task titles users get a deterministic selection of.
const TASK_TITLES: [&str; 8] = [
    "Review the release notes",
    "Answer the customer question about SSO",
    "Write the onboarding checklist",
    "Triage new bug reports",
    "Prepare the sprint demo",
    "Update the API documentation",
    "Plan the load test",
    "Clean up stale feature flags",
];
const TASK_STATUSES: [&str; 3] = ["open", "in_progress", "done"];

/// The id of `user`'s personal team (a valid channel id: at most 69 characters).
pub fn personal_team_id(user: &UserName) -> String {
    format!("home-{user}")
}

/// `GET /api/users/<id>/teams`: a JSON array of objects with `id`, the shape the
/// worker's backend client reads.
pub fn teams(user: &UserName) -> Value {
    json!([
        {"id": SHARED_TEAM_ID, "name": SHARED_TEAM_NAME, "role": "member"},
        {"id": personal_team_id(user), "name": format!("{user}'s notes"), "role": "owner"},
    ])
}

/// `GET /api/users/<id>/tasks`: [`TASKS_PER_USER`] tasks picked by a hash of the name.
pub fn tasks(user: &UserName) -> Value {
    let h = fnv1a(user.as_str().as_bytes());
    let tasks: Vec<Value> = (0..TASKS_PER_USER)
        .map(|i| {
            // Consecutive titles from a per-user start: distinct within one user.
            let title = TASK_TITLES[(h as usize + i) % TASK_TITLES.len()];
            let status = TASK_STATUSES[((h >> 8) as usize + i) % TASK_STATUSES.len()];
            let team = if i == 0 {
                SHARED_TEAM_ID.to_owned()
            } else {
                personal_team_id(user)
            };
            json!({"id": format!("{user}-task-{}", i + 1), "title": title, "status": status, "team_id": team})
        })
        .collect();
    Value::Array(tasks)
}

/// FNV-1a, 64 bit: stable across runs and platforms, unlike `std`'s hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_per_user() {
        let alice = UserName::parse("alice").unwrap();
        let bob = UserName::parse("bob").unwrap();
        assert_eq!(tasks(&alice), tasks(&alice));
        assert_ne!(tasks(&alice), tasks(&bob));
        let t = teams(&alice);
        assert_eq!(t[0]["id"], "demo");
        assert_eq!(t[1]["id"], "home-alice");
        assert_eq!(teams(&bob)[0]["id"], "demo");
        let list = tasks(&alice);
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), TASKS_PER_USER);
        let titles: std::collections::HashSet<_> =
            list.iter().map(|t| t["title"].as_str().unwrap()).collect();
        assert_eq!(titles.len(), TASKS_PER_USER);
        assert_eq!(list[0]["id"], "alice-task-1");
    }

    #[test]
    fn fnv_reference_value() {
        // FNV-1a 64 of "a" (reference vector from the FNV specification).
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
