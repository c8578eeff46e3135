//! How the domain's hand-serialised types look in the OpenAPI document
//! (`/openapi.json`): ids are patterned strings, a limit is a number or
//! `"unlimited"`, a threshold a percentage.

use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, SchemaType, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use super::config::{Limit, Percent};
use super::entitlement::Amount;
use super::ids::{EntitlementId, FeatureKey, IdempotencyKey, SeatId};

/// The pattern every id and key matches.
pub const ID_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$";

fn id_schema(description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::String))
        .pattern(Some(ID_PATTERN))
        .min_length(Some(1))
        .max_length(Some(128))
        .description(Some(description))
        .into()
}

macro_rules! id_schema {
    ($($name:ident => $doc:literal),+ $(,)?) => {
        $(
            impl PartialSchema for $name {
                fn schema() -> RefOr<Schema> {
                    id_schema($doc)
                }
            }
            impl ToSchema for $name {}
        )+
    };
}

id_schema!(
    EntitlementId => "An entitlement's id.",
    FeatureKey => "A metered feature's key.",
    SeatId => "A seat's id, chosen by the caller (a user or device).",
    IdempotencyKey => "An idempotency key: the same key, entitlement and payload answer the first decision.",
);

impl PartialSchema for Limit {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::Integer))
                    .minimum(Some(0)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::String))
                    .enum_values(Some(["unlimited"])),
            )
            .description(Some("A count, or \"unlimited\"."))
            .into()
    }
}

impl ToSchema for Limit {}

impl PartialSchema for Percent {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::Integer))
            .minimum(Some(1))
            .maximum(Some(1000))
            .description(Some("A percentage of what is included, 1 to 1000."))
            .into()
    }
}

impl ToSchema for Percent {}

impl PartialSchema for Amount {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::Integer))
            .minimum(Some(1))
            .description(Some("How much is consumed: at least 1."))
            .into()
    }
}

impl ToSchema for Amount {}
