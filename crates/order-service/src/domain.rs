//! An order as the API accepts it: parsed once from the request body into values
//! that are valid by construction.

use contracts::domain::{Quantity, Sku};
use serde::{Deserialize, Serialize};
use service_kit::problem::FieldError;

pub const MAX_ITEMS: usize = 100;
pub const CUSTOMER_ID_MAX: usize = 100;
pub const EMAIL_MAX: usize = 254;

/// The body of `POST /orders`. Server-owned fields (id, status, timestamps) are
/// not accepted: unknown fields are rejected.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// Who orders: 1 to 100 characters, no control characters (surrounding
    /// white space is trimmed). With a customer's token it may be left out
    /// (the token's subject is taken) and must otherwise be that subject;
    /// without authentication or with an operator's token it is required.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 100)]
    pub customer_id: Option<String>,
    /// Where notifications go, if anywhere: an email address of at most 254
    /// characters.
    #[serde(default)]
    #[schema(max_length = 254)]
    pub email: Option<String>,
    /// 1 to 100 lines, each SKU at most once.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<ItemRequest>,
}

/// One line of an order.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    /// 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$", min_length = 1, max_length = 64)]
    pub sku: String,
    /// Signed, so a negative number gets a clear message instead of a type error.
    #[schema(minimum = 1, maximum = 10000)]
    pub quantity: i64,
}

/// A valid new order. Its JSON form is the canonical request compared by
/// Idempotency-Key replays.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NewOrder {
    pub customer_id: String,
    pub email: Option<String>,
    pub items: Vec<Line>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Line {
    pub sku: String,
    pub quantity: u32,
}

impl NewOrder {
    pub fn parse(request: PlaceOrder) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut fail = |field: String, message: String| errors.push(FieldError { field, message });

        let customer_id = request
            .customer_id
            .as_deref()
            .map(str::trim)
            .unwrap_or_default()
            .to_owned();
        if request.customer_id.is_none() {
            fail("customer_id".into(), "is required".into());
        } else if customer_id.is_empty() {
            fail("customer_id".into(), "must not be empty".into());
        } else if customer_id.chars().count() > CUSTOMER_ID_MAX {
            fail(
                "customer_id".into(),
                format!("must be at most {CUSTOMER_ID_MAX} characters"),
            );
        } else if customer_id.chars().any(char::is_control) {
            fail(
                "customer_id".into(),
                "must not contain control characters".into(),
            );
        }

        let email = request.email.map(|e| e.trim().to_owned());
        if let Some(email) = &email
            && let Err(message) = check_email(email)
        {
            fail("email".into(), message);
        }

        if request.items.is_empty() {
            fail("items".into(), "must contain at least one item".into());
        } else if request.items.len() > MAX_ITEMS {
            fail(
                "items".into(),
                format!("must contain at most {MAX_ITEMS} items"),
            );
        }
        let mut items: Vec<Line> = Vec::with_capacity(request.items.len());
        // Every valid SKU with its position, whether or not its line is otherwise valid.
        let mut seen: Vec<(usize, Sku)> = Vec::with_capacity(request.items.len());
        if request.items.len() <= MAX_ITEMS {
            for (i, item) in request.items.iter().enumerate() {
                match Sku::parse(&item.sku) {
                    Err(message) => fail(format!("items[{i}].sku"), message),
                    Ok(sku) => {
                        if let Some((j, _)) = seen.iter().find(|(_, s)| *s == sku) {
                            fail(
                                format!("items[{i}].sku"),
                                format!("duplicates items[{j}]; order each SKU once"),
                            );
                        }
                        seen.push((i, sku));
                    }
                }
                match Quantity::parse(item.quantity) {
                    Err(message) => fail(format!("items[{i}].quantity"), message),
                    Ok(q) => items.push(Line {
                        sku: item.sku.clone(),
                        quantity: q.get(),
                    }),
                }
            }
        }
        if errors.is_empty() {
            Ok(Self {
                customer_id,
                email,
                items,
            })
        } else {
            Err(errors)
        }
    }
}

fn check_email(email: &str) -> Result<(), String> {
    if email.chars().count() > EMAIL_MAX {
        return Err(format!("must be at most {EMAIL_MAX} characters"));
    }
    match email.split_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !email.chars().any(|c| c.is_whitespace() || c.is_control())
                && !domain.contains('@') =>
        {
            Ok(())
        }
        _ => Err("is not an email address".into()),
    }
}

/// Where an order is in the saga. Moves only forward:
/// `pending → confirmed | rejected`, `pending | confirmed → cancelled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "pending" => Self::Pending,
            "confirmed" => Self::Confirmed,
            "rejected" => Self::Rejected,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> PlaceOrder {
        serde_json::from_value(json).expect("shape")
    }

    #[test]
    fn a_valid_order_parses_and_trims() {
        let order = NewOrder::parse(request(serde_json::json!({
            "customer_id": " c-1 ", "email": "ada@example.com",
            "items": [{"sku": "SKU-1", "quantity": 2}]
        })))
        .expect("valid");
        assert_eq!(order.customer_id, "c-1");
        assert_eq!(
            order.items,
            vec![Line {
                sku: "SKU-1".into(),
                quantity: 2
            }]
        );
    }

    #[test]
    fn every_invalid_field_is_reported_by_path() {
        let errors = NewOrder::parse(request(serde_json::json!({
            "customer_id": "", "email": "nope",
            "items": [{"sku": "bad sku", "quantity": 0}, {"sku": "A", "quantity": -3}, {"sku": "A", "quantity": 1}]
        })))
        .expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "customer_id",
                "email",
                "items[0].sku",
                "items[0].quantity",
                "items[1].quantity",
                "items[2].sku"
            ]
        );
    }

    #[test]
    fn empty_and_oversized_item_lists_are_rejected() {
        let errors = NewOrder::parse(request(
            serde_json::json!({"customer_id": "c", "items": []}),
        ))
        .expect_err("empty");
        assert_eq!(errors[0].field, "items");
        let many: Vec<_> = (0..101)
            .map(|i| serde_json::json!({"sku": format!("S{i}"), "quantity": 1}))
            .collect();
        let errors = NewOrder::parse(request(
            serde_json::json!({"customer_id": "c", "items": many}),
        ))
        .expect_err("many");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "items");
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            Status::Pending,
            Status::Confirmed,
            Status::Rejected,
            Status::Cancelled,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("shipped"), None);
    }
}
