// Rinha de Backend 2025 style load test, written from docs/../SPEC (not a copy
// of the official script). Runs 60 s of ramping payment traffic against the
// backend while changing the processors' conditions on a schedule, checks
// consistency every 10 s, and writes one JSON result file.
//
// Environment:
//   BACKEND_URL       default http://127.0.0.1:9999
//   PP_DEFAULT_URL    default http://127.0.0.1:8001
//   PP_FALLBACK_URL   default http://127.0.0.1:8002
//   TOKEN             processors' admin token, default 123
//   MAX_REQUESTS      VUs reached at the end of the ramp, default 550
//   SCHEDULE          inline JSON, or a path to a JSON file (SCHEDULE_FILE too)
//   RESULT_FILE       where the JSON result goes, default rinha-result.json
//
// Schedule: a list (or {"stages": [...]}) of
//   {"at": seconds, "default": {"delay": ms, "failure": bool},
//                   "fallback": {"delay": ms, "failure": bool}}
// Fields left out keep the previous stage's value (initially delay 0, healthy).

import http from 'k6/http';
import { sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';

const BACKEND = (__ENV.BACKEND_URL || 'http://127.0.0.1:9999').replace(/\/+$/, '');
const PP = {
  default: (__ENV.PP_DEFAULT_URL || 'http://127.0.0.1:8001').replace(/\/+$/, ''),
  fallback: (__ENV.PP_FALLBACK_URL || 'http://127.0.0.1:8002').replace(/\/+$/, ''),
};
const TOKEN = __ENV.TOKEN || '123';
const MAX_REQUESTS = parseInt(__ENV.MAX_REQUESTS || '550', 10);
const RESULT_FILE = __ENV.RESULT_FILE || 'rinha-result.json';
const DURATION_S = 60;
const AMOUNT = 19.90;
const TIMEOUT = '1.5s';
const JSON_HEADERS = { 'Content-Type': 'application/json' };
const ADMIN_HEADERS = { 'Content-Type': 'application/json', 'X-Rinha-Token': TOKEN };

const DEFAULT_SCHEDULE = [
  { at: 0, default: { delay: 0, failure: false }, fallback: { delay: 0, failure: false } },
  { at: 10, default: { delay: 100, failure: false }, fallback: { delay: 10, failure: false } },
  { at: 20, default: { delay: 100, failure: true }, fallback: { delay: 10, failure: false } },
  { at: 30, default: { delay: 1000, failure: true }, fallback: { delay: 2000, failure: true } },
  { at: 40, default: { delay: 20, failure: false }, fallback: { delay: 20, failure: false } },
  { at: 50, default: { delay: 0, failure: false }, fallback: { delay: 5000, failure: false } },
];

export function loadSchedule() {
  let raw = __ENV.SCHEDULE || '';
  if (!raw && __ENV.SCHEDULE_FILE) raw = open(__ENV.SCHEDULE_FILE);
  else if (raw && !/^\s*[[{]/.test(raw)) raw = open(raw);
  let stages = raw ? JSON.parse(raw) : DEFAULT_SCHEDULE;
  if (!Array.isArray(stages)) stages = stages.stages;
  if (!Array.isArray(stages) || stages.length === 0) throw new Error('schedule: expected a non-empty list of stages');
  const state = { default: { delay: 0, failure: false }, fallback: { delay: 0, failure: false } };
  return stages
    .slice()
    .sort((a, b) => Number(a.at) - Number(b.at))
    .map((s) => {
      const at = Number(s.at);
      if (!(at >= 0 && at < DURATION_S)) throw new Error(`schedule: "at" must be in [0, ${DURATION_S}), got ${s.at}`);
      for (const pp of ['default', 'fallback']) {
        const c = s[pp] || {};
        if (c.delay !== undefined) state[pp].delay = parseInt(c.delay, 10);
        if (c.failure !== undefined) state[pp].failure = c.failure === true || c.failure === 'true';
      }
      return { at, default: { ...state.default }, fallback: { ...state.fallback } };
    });
}

const SCHEDULE = loadSchedule();

const scenarios = {
  payments: {
    executor: 'ramping-vus',
    exec: 'payments',
    startVUs: 1,
    stages: [{ duration: `${DURATION_S}s`, target: MAX_REQUESTS }],
    gracefulRampDown: '0s',
    gracefulStop: '3s',
  },
  consistency: {
    executor: 'constant-vus',
    exec: 'checkConsistency',
    vus: 1,
    duration: `${DURATION_S}s`,
    gracefulStop: '2s',
  },
};
SCHEDULE.forEach((s, i) => {
  scenarios[`stage_${String(i).padStart(2, '0')}`] = {
    executor: 'shared-iterations',
    exec: 'applyStage',
    vus: 1,
    iterations: 1,
    startTime: `${s.at}s`,
    maxDuration: '8s',
    env: { STAGE_INDEX: String(i) },
  };
});

export const options = {
  scenarios,
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'max', 'count'],
  setupTimeout: '20s',
  teardownTimeout: '20s',
};

const accepted = new Counter('payments_accepted');
const rejected = new Counter('payments_failed');
const paymentsOk = new Trend('payments_ok_duration', true);
const paymentsAll = new Trend('payments_all_duration', true);
const inconsistencies = new Counter('inconsistencies');
const checksDone = new Counter('consistency_checks');
const summaryErrors = new Counter('summary_errors');
const adminErrors = new Counter('admin_errors');
const stagesApplied = new Counter('stages_applied');

// Filled by teardown (counters are the only way to pass values to handleSummary).
const END = {};
for (const k of ['backend_default_requests', 'backend_default_amount', 'backend_fallback_requests',
  'backend_fallback_amount', 'pp_default_requests', 'pp_default_amount', 'pp_default_fee_per_tx',
  'pp_fallback_requests', 'pp_fallback_amount', 'pp_fallback_fee_per_tx', 'end_summary_errors']) {
  END[k] = new Counter(`end_${k}`);
}

function adminCall(method, pp, path, body) {
  return http.asyncRequest(method, PP[pp] + path, body === undefined ? null : JSON.stringify(body), {
    headers: ADMIN_HEADERS, timeout: TIMEOUT, tags: { name: `${pp} ${method} ${path.split('?')[0]}` },
  });
}

// Processor admin summary; on failure zeros (as the official test does) and summary_errors+1.
async function ppSummary(pp, from, to) {
  const r = await adminCall('GET', pp, `/admin/payments-summary?from=${from}&to=${to}`);
  if (r.status === 200) {
    try { return { ok: true, ...JSON.parse(r.body) }; } catch (e) { /* fall through */ }
  }
  summaryErrors.add(1);
  console.error(`${pp} admin summary failed: HTTP ${r.status} ${r.error || ''}`);
  return { ok: false, totalRequests: 0, totalAmount: 0, totalFee: 0, feePerTransaction: 0 };
}

async function backendSummary(from, to) {
  const r = await http.asyncRequest('GET', `${BACKEND}/payments-summary?from=${from}&to=${to}`, null, {
    timeout: TIMEOUT, tags: { name: 'GET /payments-summary' },
  });
  if (r.status === 200) {
    try {
      const b = JSON.parse(r.body);
      return {
        ok: true,
        default: { totalRequests: b.default.totalRequests, totalAmount: b.default.totalAmount },
        fallback: { totalRequests: b.fallback.totalRequests, totalAmount: b.fallback.totalAmount },
      };
    } catch (e) { /* fall through */ }
  }
  summaryErrors.add(1);
  console.error(`backend summary failed: HTTP ${r.status} ${r.error || ''}`);
  return { ok: false, default: { totalRequests: 0, totalAmount: 0 }, fallback: { totalRequests: 0, totalAmount: 0 } };
}

async function setConditions(stage) {
  const calls = [];
  for (const pp of ['default', 'fallback']) {
    calls.push(adminCall('PUT', pp, '/admin/configurations/delay', { delay: stage[pp].delay }));
    calls.push(adminCall('PUT', pp, '/admin/configurations/failure', { failure: stage[pp].failure }));
  }
  const rs = await Promise.all(calls);
  const bad = rs.filter((r) => r.status !== 200);
  if (bad.length) adminErrors.add(bad.length);
  return bad;
}

export async function setup() {
  try {
    await http.asyncRequest('POST', `${BACKEND}/purge-payments`, null, { timeout: TIMEOUT, tags: { name: 'POST /purge-payments' } });
  } catch (e) {
    console.info(`backend purge failed (ignored): ${e}`);
  }
  for (const pp of ['default', 'fallback']) {
    const r = await adminCall('POST', pp, '/admin/purge-payments');
    if (r.status !== 200) exec.test.abort(`purge of ${pp} processor failed (HTTP ${r.status} ${r.error || ''})`);
  }
  const bad = await setConditions({ default: { delay: 0, failure: false }, fallback: { delay: 0, failure: false } });
  if (bad.length) exec.test.abort(`resetting processors failed (HTTP ${bad.map((r) => r.status).join(',')})`);
}

export function payments() {
  const body = JSON.stringify({ correlationId: crypto.randomUUID(), amount: AMOUNT });
  const r = http.post(`${BACKEND}/payments`, body, {
    headers: JSON_HEADERS, timeout: TIMEOUT, responseType: 'none', tags: { name: 'POST /payments' },
  });
  paymentsAll.add(r.timings.duration);
  if (r.status >= 200 && r.status < 300) {
    accepted.add(1);
    paymentsOk.add(r.timings.duration);
  } else {
    rejected.add(1);
  }
  sleep(1);
}

export async function applyStage() {
  const i = parseInt(__ENV.STAGE_INDEX, 10);
  const s = SCHEDULE[i];
  const bad = await setConditions(s);
  stagesApplied.add(1);
  console.info(`stage ${i} @${s.at}s: default delay=${s.default.delay} failure=${s.default.failure}; ` +
    `fallback delay=${s.fallback.delay} failure=${s.fallback.failure}` + (bad.length ? ` (${bad.length} admin calls failed)` : ''));
}

export async function checkConsistency() {
  const now = Date.now();
  const from = new Date(now - 15000).toISOString();
  const to = new Date(now - 1500).toISOString();
  const [d, f, b] = await Promise.all([ppSummary('default', from, to), ppSummary('fallback', from, to), backendSummary(from, to)]);
  const diff = Math.abs(b.default.totalRequests - d.totalRequests) + Math.abs(b.fallback.totalRequests - f.totalRequests);
  inconsistencies.add(diff);
  checksDone.add(1);
  if (diff > 0) {
    console.warn(`inconsistency in [${from}, ${to}]: backend default/fallback ${b.default.totalRequests}/${b.fallback.totalRequests}` +
      ` vs processors ${d.totalRequests}/${f.totalRequests}`);
  }
  sleep(10);
}

export async function teardown() {
  const to = new Date();
  const from = new Date(to.getTime() - 70000);
  const [d, f, b] = await Promise.all([
    ppSummary('default', from.toISOString(), to.toISOString()),
    ppSummary('fallback', from.toISOString(), to.toISOString()),
    backendSummary(from.toISOString(), to.toISOString()),
  ]);
  END.backend_default_requests.add(b.default.totalRequests);
  END.backend_default_amount.add(b.default.totalAmount);
  END.backend_fallback_requests.add(b.fallback.totalRequests);
  END.backend_fallback_amount.add(b.fallback.totalAmount);
  END.pp_default_requests.add(d.totalRequests);
  END.pp_default_amount.add(d.totalAmount);
  END.pp_default_fee_per_tx.add(d.feePerTransaction);
  END.pp_fallback_requests.add(f.totalRequests);
  END.pp_fallback_amount.add(f.totalAmount);
  END.pp_fallback_fee_per_tx.add(f.feePerTransaction);
  END.end_summary_errors.add([d, f, b].filter((x) => !x.ok).length);
}

function metric(data, name, stat) {
  const m = data.metrics[name];
  if (!m) return stat === 'count' || stat === undefined ? 0 : null;
  const v = m.values[stat || 'count'];
  return v === undefined ? null : v;
}

const r2 = (x) => (x === null || x === undefined ? x : Math.round(x * 100) / 100);

export function handleSummary(data) {
  const c = (name) => metric(data, name, 'count');
  const e = (k) => c(`end_${k}`);

  const p99 = metric(data, 'http_req_duration{expected_response:true}', 'p(99)');
  const bonus = p99 === null ? 0 : Math.max((11 - p99) * 0.02, 0);
  const nIncons = c('inconsistencies');
  const fine = nIncons > 0 ? 0.35 : 0;

  const backend = {
    default: { requests: e('backend_default_requests'), amount: e('backend_default_amount') },
    fallback: { requests: e('backend_fallback_requests'), amount: e('backend_fallback_amount') },
  };
  const processors = {
    default: { requests: e('pp_default_requests'), amount: e('pp_default_amount'), fee_per_transaction: e('pp_default_fee_per_tx') },
    fallback: { requests: e('pp_fallback_requests'), amount: e('pp_fallback_amount'), fee_per_transaction: e('pp_fallback_fee_per_tx') },
  };
  // Score as SPEC.md states it: backend-reported amounts, fee = processor fee x backend amount.
  const fees = {
    default: processors.default.fee_per_transaction * backend.default.amount,
    fallback: processors.fallback.fee_per_transaction * backend.fallback.amount,
  };
  fees.total = fees.default + fees.fallback;
  const gross = backend.default.amount + backend.fallback.amount;
  const net = gross - fees.total;
  const score = net * (1 + bonus - fine);
  // Same formula on the processors' own totals (what the final official script used).
  const ppGross = processors.default.amount + processors.fallback.amount;
  const ppNet = ppGross - processors.default.fee_per_transaction * processors.default.amount
    - processors.fallback.fee_per_transaction * processors.fallback.amount;

  const nAccepted = c('payments_accepted');
  const reported = backend.default.requests + backend.fallback.requests;
  const lag = nAccepted - reported;

  const result = {
    kind: 'rinha-bench-k6',
    timestamp: new Date().toISOString(),
    backend_url: BACKEND,
    max_requests: MAX_REQUESTS,
    duration_s: DURATION_S,
    schedule: SCHEDULE,
    p99_ms: p99,
    p99_bonus: bonus,
    inconsistencies: nIncons,
    consistency_checks: c('consistency_checks'),
    fine,
    score,
    score_processor_view: ppNet * (1 + bonus - fine),
    total_gross: gross,
    total_fees: fees.total,
    requests: {
      accepted: nAccepted,
      failed: c('payments_failed'),
      http_total: c('http_reqs'),
      http_failed_rate: metric(data, 'http_req_failed', 'rate'),
    },
    payments: { backend, processors },
    fees,
    lag: {
      accepted: nAccepted,
      reported_by_backend: reported,
      stored_by_processors: processors.default.requests + processors.fallback.requests,
      lag,
      negative: lag < 0,
      note: lag < 0 ? 'NEGATIVE LAG: backend reports more payments than were accepted (disqualifying)' : undefined,
    },
    payments_post: {
      p99_ms_ok: metric(data, 'payments_ok_duration', 'p(99)'),
      p99_ms_all: metric(data, 'payments_all_duration', 'p(99)'),
      avg_ms_ok: metric(data, 'payments_ok_duration', 'avg'),
      max_ms_ok: metric(data, 'payments_ok_duration', 'max'),
    },
    http_ok: {
      count: metric(data, 'http_req_duration{expected_response:true}', 'count'),
      avg_ms: metric(data, 'http_req_duration{expected_response:true}', 'avg'),
      med_ms: metric(data, 'http_req_duration{expected_response:true}', 'med'),
      p90_ms: metric(data, 'http_req_duration{expected_response:true}', 'p(90)'),
      max_ms: metric(data, 'http_req_duration{expected_response:true}', 'max'),
    },
    errors: {
      summary_errors: c('summary_errors'),
      end_summary_errors: e('end_summary_errors'),
      admin_errors: c('admin_errors'),
      stages_applied: c('stages_applied'),
      stages_scheduled: SCHEDULE.length,
    },
    vus_max: metric(data, 'vus_max', 'max'),
    test_run_duration_ms: data.state ? data.state.testRunDurationMs : null,
  };

  const text = [
    '',
    `rinha k6: ${BACKEND}  MAX_REQUESTS=${MAX_REQUESTS}`,
    `  p99 (all successful HTTP)  ${p99 === null ? 'n/a' : p99.toFixed(3)} ms   bonus ${(bonus * 100).toFixed(2)} %`,
    `  p99 (POST /payments ok)    ${result.payments_post.p99_ms_ok === null ? 'n/a' : result.payments_post.p99_ms_ok.toFixed(3)} ms`,
    `  payments accepted/failed   ${nAccepted} / ${result.requests.failed}`,
    `  backend default/fallback   ${backend.default.requests} / ${backend.fallback.requests}   processors ${processors.default.requests} / ${processors.fallback.requests}`,
    `  lag                        ${lag}${lag < 0 ? '  NEGATIVE (disqualifying)' : ''}`,
    `  inconsistencies            ${nIncons} in ${result.consistency_checks} checks   fine ${fine}`,
    `  fees                       ${r2(fees.total)}   gross ${r2(gross)}`,
    `  score (total_liquido)      ${r2(score)}`,
    `  summary/admin errors       ${result.errors.summary_errors} / ${result.errors.admin_errors}   stages ${result.errors.stages_applied}/${SCHEDULE.length}`,
    '',
  ].join('\n');

  return { stdout: text, [RESULT_FILE]: JSON.stringify(result, null, 2) };
}
