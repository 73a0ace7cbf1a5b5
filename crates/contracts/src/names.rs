//! Broker names fixed by the external contract (DESIGN.md).

/// Topic exchange carrying every domain event; routing key `<aggregate>.<event>`.
pub const EVENTS_EXCHANGE: &str = "shop.events";
/// Fanout exchange receiving every `order.*` event from [`EVENTS_EXCHANGE`].
pub const NOTIFICATIONS_EXCHANGE: &str = "shop.notifications";
/// Dead-letter exchange (direct; routing key = the failing queue's name).
pub const DEAD_LETTER_EXCHANGE: &str = "shop.dlx";

pub const INVENTORY_QUEUE: &str = "inventory.order-events";
pub const ORDER_QUEUE: &str = "order.inventory-events";
pub const NOTIFICATION_QUEUE: &str = "notification.order-events";

/// Routing keys.
pub mod keys {
    pub const ORDER_PLACED: &str = "order.placed";
    pub const ORDER_CONFIRMED: &str = "order.confirmed";
    pub const ORDER_REJECTED: &str = "order.rejected";
    pub const ORDER_CANCELLED: &str = "order.cancelled";
    pub const STOCK_RESERVED: &str = "inventory.reserved";
    pub const STOCK_REJECTED: &str = "inventory.rejected";
    pub const STOCK_RELEASED: &str = "inventory.released";
    /// Binding pattern of every order event.
    pub const ALL_ORDER: &str = "order.*";
    /// Binding pattern of every inventory event.
    pub const ALL_INVENTORY: &str = "inventory.*";
}
