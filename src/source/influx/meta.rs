//! The InfluxDB 1.x metastore (`meta.Data`, `services/meta/internal/meta.proto`, the same
//! from 1.6 to 1.8): decoded to list what a snapshot holds and to check what a restore
//! asks for, and cut down to one database for a restore (the server needs only that, and
//! a small upload arrives in one piece). Users are decoded for the record only: the
//! restore protocol cannot create them.

use prost::Message;

/// `meta.Data`.
#[derive(Clone, PartialEq, Message)]
pub struct Data {
    #[prost(uint64, required, tag = "1")]
    pub term: u64,
    #[prost(uint64, required, tag = "2")]
    pub index: u64,
    #[prost(uint64, required, tag = "3")]
    pub cluster_id: u64,
    #[prost(message, repeated, tag = "4")]
    pub nodes: Vec<NodeInfo>,
    #[prost(message, repeated, tag = "5")]
    pub databases: Vec<DatabaseInfo>,
    #[prost(message, repeated, tag = "6")]
    pub users: Vec<UserInfo>,
    #[prost(uint64, required, tag = "7")]
    pub max_node_id: u64,
    #[prost(uint64, required, tag = "8")]
    pub max_shard_group_id: u64,
    #[prost(uint64, required, tag = "9")]
    pub max_shard_id: u64,
    #[prost(message, repeated, tag = "10")]
    pub data_nodes: Vec<NodeInfo>,
    #[prost(message, repeated, tag = "11")]
    pub meta_nodes: Vec<NodeInfo>,
}

/// `meta.NodeInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct NodeInfo {
    #[prost(uint64, required, tag = "1")]
    pub id: u64,
    #[prost(string, required, tag = "2")]
    pub host: String,
    #[prost(string, optional, tag = "3")]
    pub tcp_host: Option<String>,
}

/// `meta.DatabaseInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct DatabaseInfo {
    #[prost(string, required, tag = "1")]
    pub name: String,
    #[prost(string, required, tag = "2")]
    pub default_retention_policy: String,
    #[prost(message, repeated, tag = "3")]
    pub retention_policies: Vec<RetentionPolicyInfo>,
    #[prost(message, repeated, tag = "4")]
    pub continuous_queries: Vec<ContinuousQueryInfo>,
}

/// `meta.RetentionPolicyInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct RetentionPolicyInfo {
    #[prost(string, required, tag = "1")]
    pub name: String,
    /// Nanoseconds; 0 is forever.
    #[prost(int64, required, tag = "2")]
    pub duration: i64,
    #[prost(int64, required, tag = "3")]
    pub shard_group_duration: i64,
    #[prost(uint32, required, tag = "4")]
    pub replica_n: u32,
    #[prost(message, repeated, tag = "5")]
    pub shard_groups: Vec<ShardGroupInfo>,
    #[prost(message, repeated, tag = "6")]
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// `meta.ShardGroupInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct ShardGroupInfo {
    #[prost(uint64, required, tag = "1")]
    pub id: u64,
    /// Unix nanoseconds.
    #[prost(int64, required, tag = "2")]
    pub start_time: i64,
    #[prost(int64, required, tag = "3")]
    pub end_time: i64,
    /// Unix nanoseconds; 0 when not deleted.
    #[prost(int64, required, tag = "4")]
    pub deleted_at: i64,
    #[prost(message, repeated, tag = "5")]
    pub shards: Vec<ShardInfo>,
    #[prost(int64, optional, tag = "6")]
    pub truncated_at: Option<i64>,
}

/// `meta.ShardInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct ShardInfo {
    #[prost(uint64, required, tag = "1")]
    pub id: u64,
    #[prost(uint64, repeated, packed = "false", tag = "2")]
    pub owner_ids: Vec<u64>,
    #[prost(message, repeated, tag = "3")]
    pub owners: Vec<ShardOwner>,
}

/// `meta.SubscriptionInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct SubscriptionInfo {
    #[prost(string, required, tag = "1")]
    pub name: String,
    #[prost(string, required, tag = "2")]
    pub mode: String,
    #[prost(string, repeated, tag = "3")]
    pub destinations: Vec<String>,
}

/// `meta.ShardOwner`.
#[derive(Clone, PartialEq, Message)]
pub struct ShardOwner {
    #[prost(uint64, required, tag = "1")]
    pub node_id: u64,
}

/// `meta.ContinuousQueryInfo`.
#[derive(Clone, PartialEq, Message)]
pub struct ContinuousQueryInfo {
    #[prost(string, required, tag = "1")]
    pub name: String,
    /// The whole `CREATE CONTINUOUS QUERY ...` statement.
    #[prost(string, required, tag = "2")]
    pub query: String,
}

/// `meta.UserInfo` (the hash is kept in the snapshot's copy of the metastore, never
/// shown).
#[derive(Clone, PartialEq, Message)]
pub struct UserInfo {
    #[prost(string, required, tag = "1")]
    pub name: String,
    #[prost(string, required, tag = "2")]
    pub hash: String,
    #[prost(bool, required, tag = "3")]
    pub admin: bool,
    #[prost(message, repeated, tag = "4")]
    pub privileges: Vec<UserPrivilege>,
}

/// `meta.UserPrivilege`.
#[derive(Clone, PartialEq, Message)]
pub struct UserPrivilege {
    #[prost(string, required, tag = "1")]
    pub database: String,
    #[prost(int32, required, tag = "2")]
    pub privilege: i32,
}

impl Data {
    /// Decodes a metastore.
    ///
    /// # Errors
    /// Bytes that are not a `meta.Data`.
    pub fn parse(b: &[u8]) -> Result<Self, String> {
        Data::decode(b).map_err(|e| format!("not an InfluxDB metastore: {e}"))
    }

    /// The database named `name`.
    pub fn database(&self, name: &str) -> Option<&DatabaseInfo> {
        self.databases.iter().find(|d| d.name == name)
    }

    /// This metastore with only database `name` (and no users, nodes or subscriptions):
    /// what a restore of that database uploads.
    pub fn only_database(&self, name: &str) -> Option<Vec<u8>> {
        let mut db = self.database(name)?.clone();
        for rp in &mut db.retention_policies {
            rp.subscriptions.clear();
        }
        let cut = Data {
            nodes: vec![],
            users: vec![],
            data_nodes: vec![],
            meta_nodes: vec![],
            databases: vec![db],
            ..self.clone()
        };
        Some(cut.encode_to_vec())
    }
}

impl DatabaseInfo {
    /// Every shard, of deleted groups too: (retention policy, shard group, shard id).
    pub fn all_shards(&self) -> impl Iterator<Item = (&RetentionPolicyInfo, &ShardGroupInfo, u64)> {
        self.retention_policies.iter().flat_map(|rp| {
            rp.shard_groups
                .iter()
                .flat_map(move |g| g.shards.iter().map(move |s| (rp, g, s.id)))
        })
    }

    /// Every live shard: (retention policy, shard group, shard id).
    pub fn shards(&self) -> impl Iterator<Item = (&RetentionPolicyInfo, &ShardGroupInfo, u64)> {
        self.retention_policies.iter().flat_map(|rp| {
            rp.shard_groups
                .iter()
                .filter(|g| g.deleted_at == 0)
                .flat_map(move |g| g.shards.iter().map(move |s| (rp, g, s.id)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Data {
        Data {
            term: 1,
            index: 9,
            cluster_id: 77,
            nodes: vec![NodeInfo {
                id: 1,
                host: "localhost:8088".into(),
                tcp_host: None,
            }],
            databases: vec![
                DatabaseInfo {
                    name: "a".into(),
                    default_retention_policy: "autogen".into(),
                    retention_policies: vec![RetentionPolicyInfo {
                        name: "autogen".into(),
                        duration: 0,
                        shard_group_duration: 604_800_000_000_000,
                        replica_n: 1,
                        shard_groups: vec![
                            ShardGroupInfo {
                                id: 1,
                                start_time: 0,
                                end_time: 10,
                                deleted_at: 0,
                                shards: vec![ShardInfo {
                                    id: 3,
                                    owner_ids: vec![],
                                    owners: vec![ShardOwner { node_id: 1 }],
                                }],
                                truncated_at: None,
                            },
                            ShardGroupInfo {
                                id: 2,
                                start_time: 10,
                                end_time: 20,
                                deleted_at: 15,
                                shards: vec![ShardInfo {
                                    id: 4,
                                    owner_ids: vec![],
                                    owners: vec![],
                                }],
                                truncated_at: None,
                            },
                        ],
                        subscriptions: vec![],
                    }],
                    continuous_queries: vec![],
                },
                DatabaseInfo {
                    name: "b".into(),
                    default_retention_policy: "autogen".into(),
                    retention_policies: vec![],
                    continuous_queries: vec![],
                },
            ],
            users: vec![UserInfo {
                name: "admin".into(),
                hash: "secret hash".into(),
                admin: true,
                privileges: vec![],
            }],
            max_node_id: 1,
            max_shard_group_id: 2,
            max_shard_id: 4,
            data_nodes: vec![],
            meta_nodes: vec![],
        }
    }

    #[test]
    fn a_metastore_round_trips_and_is_cut_to_one_database_without_users() {
        let d = sample();
        let back = Data::parse(&d.encode_to_vec()).unwrap();
        assert_eq!(back, d);
        let cut = Data::parse(&d.only_database("a").unwrap()).unwrap();
        assert_eq!(cut.databases.len(), 1);
        assert_eq!(cut.databases[0], d.databases[0]);
        assert!(cut.users.is_empty() && cut.nodes.is_empty());
        assert_eq!(cut.max_shard_id, 4);
        assert!(d.only_database("c").is_none());
        let live: Vec<u64> = d.databases[0].shards().map(|(_, _, id)| id).collect();
        assert_eq!(live, [3], "a deleted shard group's shards are not live");
        assert!(Data::parse(b"\xff\xff\xff").is_err());
    }
}
