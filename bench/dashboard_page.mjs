// The dashboard in headless Chromium with a large fleet (bench/dashboard.sh):
// time to the full table, renders while a publish's ACKs stream in, and a
// filter. Prints one JSON object.
//
//   node dashboard_page.mjs URL NODES
import { chromium } from "playwright-core";

const [url, nodesArg] = process.argv.slice(2);
const nodes = Number(nodesArg);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  await page.waitForFunction((n) => document.body.dataset.matched === String(n), nodes, { timeout: 60_000 });
  const firstRender = await page.evaluate(() => performance.now());
  const lastRender = () => performance.getEntriesByName("render").at(-1).duration;
  const renderMs = await page.evaluate(lastRender);
  const shownRows = await page.evaluate(() => Number(document.body.dataset.rows));
  // Every row drawn ("Show all"), then a re-sort of all of them.
  await page.click("#show-all");
  await page.waitForFunction((n) => document.body.dataset.rows === String(n), nodes, { timeout: 60_000 });
  const allRowsMs = await page.evaluate(lastRender);
  // By id, then by id descending: every row moves.
  await page.click('th[data-sort="id"]');
  await page.waitForTimeout(300);
  await page.click('th[data-sort="id"]');
  await page.waitForTimeout(500);
  const resortAllMs = await page.evaluate(lastRender);
  await page.click('th[data-sort="state"]');
  await page.waitForTimeout(500);
  await page.reload();
  await page.waitForFunction((n) => document.body.dataset.matched === String(n), nodes, { timeout: 60_000 });

  // The publish (fleet-load's, after its delay): renders while ACKs arrive.
  await page.evaluate(() => performance.clearMeasures("render"));
  await page.waitForFunction(() => /^v1 on/.test(document.getElementById("headline").textContent), null, {
    timeout: 60_000,
    polling: 10,
  });
  const publishShown = Date.now();
  await page.waitForFunction(
    (n) => document.getElementById("headline").textContent.startsWith(`v1 on ${n} of ${n} nodes`),
    nodes,
    { timeout: 60_000, polling: 10 },
  );
  const allShown = Date.now();
  const renders = await page.evaluate(() =>
    performance.getEntriesByName("render").map((e) => e.duration).sort((a, b) => a - b),
  );

  const filterMs = await page.evaluate(async () => {
    const input = document.getElementById("node-filter");
    const started = performance.now();
    input.value = "sim-00042";
    input.dispatchEvent(new Event("input"));
    await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
    if (document.body.dataset.rows !== "1") throw new Error(`filter shows ${document.body.dataset.rows} rows`);
    return performance.now() - started;
  });
  console.log(
    JSON.stringify({
      nodes,
      first_render_ms: firstRender,
      render_ms: renderMs,
      rows_shown: shownRows,
      all_rows_ms: allRowsMs,
      resort_all_ms: resortAllMs,
      publish_renders: renders.length,
      publish_render_p50_ms: renders[Math.floor(renders.length / 2)] || 0,
      publish_render_max_ms: renders.at(-1) || 0,
      publish_shown_ms: allShown - publishShown,
      filter_ms: filterMs,
    }),
  );
} finally {
  await browser.close();
}
