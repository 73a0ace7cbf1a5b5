//! `stock set`: available units of SKUs, through inventory-service's API.

use serde_json::{Value, json};

use crate::{
    Error,
    api::Api,
    cli::Cli,
    output::{Table, cell, print_json},
};

pub async fn set(cli: &Cli, levels: &[(String, i64)]) -> Result<(), Error> {
    let api = Api::new(cli)?;
    let base = cli.inventory_url.trim_end_matches('/');
    let mut results = Vec::new();
    for (sku, available) in levels {
        let url = format!("{base}/stock/{sku}");
        let level = api
            .put(
                "inventory-service",
                &url,
                &json!({ "available": available }),
            )
            .await?;
        results.push(level);
    }
    if cli.json {
        print_json(&Value::Array(results));
    } else {
        let mut table = Table::new(&["SKU", "AVAILABLE", "RESERVED"]);
        for level in &results {
            let cell = |name: &str| cell(level.get(name).unwrap_or(&Value::Null));
            table.row(vec![cell("sku"), cell("available"), cell("reserved")]);
        }
        print!("{}", table.render());
    }
    Ok(())
}
