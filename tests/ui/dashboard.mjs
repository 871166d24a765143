// The dashboard in a real browser (Debian's chromium driven by
// playwright-core), against a live gateway and broker that tests/ui.rs
// prepared: a queue with tasks, and a queue with a dead letter.
// Prints one line per step reached; tests/ui.rs checks them and the API.
//
//   node tests/ui/dashboard.mjs http://127.0.0.1:8088 target/ui-dashboard.png TOKEN
import { chromium } from "playwright-core";

const [base, shot, token] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // As root, without the network this machine does not have.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.setDefaultTimeout(15000);
  page.on("dialog", (d) => d.accept());
  page.on("pageerror", (e) => console.log("PAGEERROR " + e.message));

  await page.goto(base + "/ui");
  // The gateway has a token: the page asks for it.
  await page.locator("#token-box").waitFor({ state: "visible" });
  console.log("ASKED FOR A TOKEN");
  await page.locator("#token").fill(token);
  await page.locator("#token-form button").click();
  const demo = page.locator('#queues tr[data-queue="ui-demo"]');
  await demo.waitFor();
  console.log("QUEUE " + (await demo.innerText()).replace(/\s+/g, " "));
  await demo.click();
  await page.locator("#tasks tr[data-task]").first().waitFor();
  console.log("TASKS " + (await page.locator("#tasks tr[data-task]").count()));
  await page.locator("#pause").click();
  await page.locator("#paused").waitFor();
  console.log("PAUSED");

  await page.goto(base + "/ui#/queue/ui-dead");
  await page.locator('button[data-state="failed"]').click();
  const dead = page.locator("#tasks tr[data-task]").first();
  await dead.waitFor();
  const id = await dead.getAttribute("data-task");
  await dead.click();
  await page.locator("#detail").waitFor();
  console.log("DETAIL " + (await page.locator("#detail").innerText()).replace(/\s+/g, " "));
  await page.locator("#run").click();
  console.log("RAN " + id);

  await page.goto(base + "/ui#/cluster");
  await page.locator("#nodes tbody tr").first().waitFor();
  console.log("NODES " + (await page.locator("#nodes tbody tr").count()));

  await page.goto(base + "/ui#/");
  await demo.waitFor();
  await page.screenshot({ path: shot, fullPage: true });
  console.log("DONE");
} finally {
  await browser.close();
}
