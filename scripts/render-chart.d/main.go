// Command render-chart renders a Helm 3 chart offline, with the semantics of
// `helm template`, for machines that have no helm binary.
//
// It is the fallback of scripts/render-chart (which prefers helm when it is on PATH)
// and is built on first use with the Debian Go toolchain in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o render-chart main.go
//
// (Debian packages golang-go, golang-github-masterminds-sprig-dev and
// golang-k8s-sigs-yaml-dev.)
//
// What it does as Helm does:
//   - values: the chart's values.yaml, then each -f file deep-merged in order, then
//     --set (Helm's type inference: true/false/null, integers without a leading 0;
//     a.b=c, a[0]=x, {x,y} lists, \, and \. escapes), then --set-string; a null
//     removes a default key. YAML numbers are float64, as sigs.k8s.io/yaml makes them.
//   - the template data: .Values, .Release (Name, Namespace, Service "Helm",
//     IsInstall, IsUpgrade, Revision), .Chart (Chart.yaml), .Capabilities
//     (KubeVersion, APIVersions.Has, HelmVersion), .Template (Name, BasePath), .Files.
//   - one template set holding every file under templates/ (parsed in Helm's order,
//     so later defines win the same way), `missingkey=zero` with "<no value>"
//     removed, sprig's TxtFuncMap without env/expandenv, and Helm's include, tpl,
//     required, toYaml, fromYaml, fromYamlArray, toJson, fromJson, fromJsonArray,
//     lookup (always an empty map: no cluster), fail (sprig).
//   - output: files whose name starts with "_" and NOTES.txt are not output; each
//     rendered file is split on "---" lines, empty documents are dropped, every
//     document must parse as YAML, documents are ordered by kind in Helm's install
//     order (stable, files in path order) with hooks last, each under a
//     "# Source: CHART/templates/FILE" header.
//   - Chart.yaml's kubeVersion constraint is checked against --kube-version.
//
// Not supported (refused with an error rather than rendered differently):
// subcharts/dependencies, values.schema.json, toToml. .Files offers Get, GetBytes
// and Lines; .helmignore is not read (dotfiles under templates/ are skipped, as
// Helm's default rules do).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

// ---------------------------------------------------------------------------------
// command line

type options struct {
	chart       string
	release     string
	namespace   string
	kubeVersion string
	apiVersions []string
	valueFiles  []string
	sets        []setArg
	notes       bool
}

type setArg struct {
	expr  string
	typed bool
}

const usage = `usage: render-chart CHART [--set K=V]... [--set-string K=V]... [-f VALUES]...
                    [--release NAME] [--namespace NS] [--kube-version V]
                    [--api-versions GROUP/VERSION]... [--notes]`

func parseArgs(argv []string) (*options, error) {
	o := &options{release: "release-name", namespace: "default", kubeVersion: "1.30.0"}
	for i := 0; i < len(argv); i++ {
		a := argv[i]
		name, val, hasVal := a, "", false
		if strings.HasPrefix(a, "--") {
			if k, v, ok := strings.Cut(a, "="); ok {
				name, val, hasVal = k, v, true
			}
		} else if strings.HasPrefix(a, "-f") && len(a) > 2 {
			name, val, hasVal = "-f", a[2:], true
		}
		takes := map[string]bool{"--set": true, "--set-string": true, "-f": true, "--values": true,
			"--release": true, "--namespace": true, "-n": true, "--kube-version": true, "--api-versions": true}
		if takes[name] && !hasVal {
			if i+1 >= len(argv) {
				return nil, fmt.Errorf("%s needs a value", name)
			}
			i++
			val = argv[i]
		}
		switch name {
		case "--set":
			o.sets = append(o.sets, setArg{val, true})
		case "--set-string":
			o.sets = append(o.sets, setArg{val, false})
		case "-f", "--values":
			o.valueFiles = append(o.valueFiles, val)
		case "--release":
			o.release = val
		case "--namespace", "-n":
			o.namespace = val
		case "--kube-version":
			o.kubeVersion = val
		case "--api-versions":
			o.apiVersions = append(o.apiVersions, strings.Split(val, ",")...)
		case "--notes":
			o.notes = true
		case "-h", "--help":
			fmt.Println(usage)
			os.Exit(0)
		default:
			if strings.HasPrefix(a, "-") && a != "-" {
				return nil, fmt.Errorf("unknown option %s\n%s", a, usage)
			}
			if o.chart != "" {
				return nil, fmt.Errorf("one CHART only (got %q and %q)\n%s", o.chart, a, usage)
			}
			o.chart = a
		}
	}
	if o.chart == "" {
		return nil, errors.New(usage)
	}
	return o, nil
}

// ---------------------------------------------------------------------------------
// chart

// Metadata is Chart.yaml, with the field names templates see as .Chart.X.
type Metadata struct {
	Name         string            `json:"name,omitempty"`
	Home         string            `json:"home,omitempty"`
	Sources      []string          `json:"sources,omitempty"`
	Version      string            `json:"version,omitempty"`
	Description  string            `json:"description,omitempty"`
	Keywords     []string          `json:"keywords,omitempty"`
	Maintainers  []*Maintainer     `json:"maintainers,omitempty"`
	Icon         string            `json:"icon,omitempty"`
	APIVersion   string            `json:"apiVersion,omitempty"`
	Condition    string            `json:"condition,omitempty"`
	Tags         string            `json:"tags,omitempty"`
	AppVersion   string            `json:"appVersion,omitempty"`
	Deprecated   bool              `json:"deprecated,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
	KubeVersion  string            `json:"kubeVersion,omitempty"`
	Dependencies []interface{}     `json:"dependencies,omitempty"`
	Type         string            `json:"type,omitempty"`
}

// Maintainer is one entry of Chart.yaml's maintainers.
type Maintainer struct {
	Name  string `json:"name,omitempty"`
	Email string `json:"email,omitempty"`
	URL   string `json:"url,omitempty"`
}

type chartDir struct {
	meta      *Metadata
	values    map[string]interface{}
	templates map[string]string // "templates/x.yaml" -> text
	files     Files             // every other file, by path relative to the chart
}

func loadChart(dir string) (*chartDir, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, fmt.Errorf("%s: not a chart: %w", dir, err)
	}
	meta := &Metadata{}
	if err := yaml.Unmarshal(raw, meta); err != nil {
		return nil, fmt.Errorf("Chart.yaml: %w", err)
	}
	switch {
	case meta.APIVersion == "":
		return nil, errors.New("Chart.yaml: apiVersion is required")
	case meta.Name == "":
		return nil, errors.New("Chart.yaml: name is required")
	case meta.Version == "":
		return nil, errors.New("Chart.yaml: version is required")
	}
	if _, err := semver.StrictNewVersion(meta.Version); err != nil {
		return nil, fmt.Errorf("Chart.yaml: version %q is not a valid SemVer 2 version", meta.Version)
	}
	if meta.Type == "library" {
		return nil, errors.New("a library chart cannot be rendered")
	}
	if len(meta.Dependencies) > 0 {
		return nil, errors.New("Chart.yaml has dependencies: subcharts are not supported by the offline renderer (use helm)")
	}
	c := &chartDir{meta: meta, values: map[string]interface{}{}, templates: map[string]string{}, files: Files{}}
	if raw, err := os.ReadFile(filepath.Join(dir, "values.yaml")); err == nil {
		if err := yaml.Unmarshal(raw, &c.values); err != nil {
			return nil, fmt.Errorf("values.yaml: %w", err)
		}
		if c.values == nil {
			c.values = map[string]interface{}{}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			if rel == ".git" {
				return filepath.SkipDir
			}
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		switch {
		case rel == "Chart.yaml" || rel == "values.yaml" || rel == "Chart.lock" || rel == "requirements.yaml":
		case rel == "values.schema.json":
			return errors.New("values.schema.json is not supported by the offline renderer (use helm)")
		case strings.HasPrefix(rel, "charts/"):
			return errors.New("charts/ holds subcharts: not supported by the offline renderer (use helm)")
		case strings.HasPrefix(rel, "templates/"):
			if strings.HasPrefix(path.Base(rel), ".") {
				return nil
			}
			c.templates[rel] = string(data)
		default:
			c.files[rel] = data
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Files is .Files: the chart's files outside templates/.
type Files map[string][]byte

// Get returns a file's content as a string ("" when absent).
func (f Files) Get(name string) string { return string(f[name]) }

// GetBytes returns a file's content as bytes (nil when absent).
func (f Files) GetBytes(name string) []byte { return f[name] }

// Lines returns a file's lines.
func (f Files) Lines(name string) []string {
	if f == nil || f[name] == nil {
		return []string{}
	}
	return strings.Split(string(f[name]), "\n")
}

// ---------------------------------------------------------------------------------
// capabilities

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

func (k KubeVersion) String() string { return k.Version }

// GitVersion is the deprecated spelling of Version.
func (k KubeVersion) GitVersion() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has tells whether the cluster serves an API version ("apps/v1") or a kind of one
// ("apps/v1/Deployment"; kinds are assumed served when their group/version is).
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	parts := strings.Split(apiVersion, "/")
	if len(parts) >= 2 {
		gv := strings.Join(parts[:len(parts)-1], "/")
		for _, x := range v {
			if x == gv {
				return true
			}
		}
	}
	return false
}

// HelmVersion is .Capabilities.HelmVersion.
type HelmVersion struct {
	Version      string `json:"version,omitempty"`
	GitCommit    string `json:"git_commit,omitempty"`
	GitTreeState string `json:"git_tree_state,omitempty"`
	GoVersion    string `json:"go_version,omitempty"`
}

// Capabilities is .Capabilities.
type Capabilities struct {
	APIVersions VersionSet
	KubeVersion KubeVersion
	HelmVersion HelmVersion
}

var defaultAPIVersions = []string{
	"v1", "admissionregistration.k8s.io/v1", "apiextensions.k8s.io/v1", "apiregistration.k8s.io/v1",
	"apps/v1", "authentication.k8s.io/v1", "authorization.k8s.io/v1", "autoscaling/v1", "autoscaling/v2",
	"batch/v1", "certificates.k8s.io/v1", "coordination.k8s.io/v1", "discovery.k8s.io/v1",
	"events.k8s.io/v1", "flowcontrol.apiserver.k8s.io/v1", "flowcontrol.apiserver.k8s.io/v1beta3",
	"networking.k8s.io/v1", "node.k8s.io/v1", "policy/v1", "rbac.authorization.k8s.io/v1",
	"scheduling.k8s.io/v1", "storage.k8s.io/v1",
}

func capabilities(kube string, extra []string) (*Capabilities, error) {
	v, err := semver.NewVersion(kube)
	if err != nil {
		return nil, fmt.Errorf("--kube-version %q: %w", kube, err)
	}
	return &Capabilities{
		APIVersions: append(VersionSet(append([]string{}, defaultAPIVersions...)), extra...),
		KubeVersion: KubeVersion{Version: "v" + v.String(), Major: strconv.FormatUint(v.Major(), 10),
			Minor: strconv.FormatUint(v.Minor(), 10)},
		HelmVersion: HelmVersion{Version: "v3.15.0", GitTreeState: "offline", GoVersion: "go"},
	}, nil
}

// ---------------------------------------------------------------------------------
// values

func readValueFile(name string) (map[string]interface{}, error) {
	var raw []byte
	var err error
	if name == "-" {
		raw, err = io.ReadAll(os.Stdin)
	} else {
		raw, err = os.ReadFile(name)
	}
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("failed to parse %s: %w", name, err)
	}
	if m == nil {
		m = map[string]interface{}{}
	}
	return m, nil
}

// mergeMaps is Helm's merge of -f files: b over a, maps merged key by key.
func mergeMaps(a, b map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(a))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if vm, ok := v.(map[string]interface{}); ok {
			if bv, ok := out[k]; ok {
				if bvm, ok := bv.(map[string]interface{}); ok {
					out[k] = mergeMaps(bvm, vm)
					continue
				}
			}
		}
		out[k] = v
	}
	return out
}

// coalesce lays the chart's defaults under the user's values, as chartutil does: a
// user null deletes the default; tables merge; otherwise the user's value stands.
func coalesce(user, defaults map[string]interface{}) map[string]interface{} {
	for key, dv := range defaults {
		uv, ok := user[key]
		switch {
		case ok && uv == nil:
			delete(user, key)
		case !ok:
			user[key] = deepCopy(dv)
		default:
			um, uok := uv.(map[string]interface{})
			dm, dok := dv.(map[string]interface{})
			if uok && dok {
				coalesce(um, dm)
			} else if uok != dok && dv != nil {
				fmt.Fprintf(os.Stderr, "coalesce.go: warning: cannot overwrite table with non table for %s\n", key)
			}
		}
	}
	return user
}

func deepCopy(v interface{}) interface{} {
	switch t := v.(type) {
	case map[string]interface{}:
		m := make(map[string]interface{}, len(t))
		for k, x := range t {
			m[k] = deepCopy(x)
		}
		return m
	case []interface{}:
		l := make([]interface{}, len(t))
		for i, x := range t {
			l[i] = deepCopy(x)
		}
		return l
	}
	return v
}

// typedVal is strvals' type inference for --set.
func typedVal(val string, typed bool) interface{} {
	if !typed {
		return val
	}
	switch {
	case strings.EqualFold(val, "true"):
		return true
	case strings.EqualFold(val, "false"):
		return false
	case strings.EqualFold(val, "null"):
		return nil
	case val == "0":
		return int64(0)
	}
	if len(val) != 0 && val[0] != '0' {
		if iv, err := strconv.ParseInt(val, 10, 64); err == nil {
			return iv
		}
	}
	return val
}

// splitUnescaped splits s at each sep that is not escaped by a backslash and not
// inside {...}; escapes are kept for the next stage.
func splitUnescaped(s string, sep rune, braces bool) []string {
	var parts []string
	var cur strings.Builder
	depth := 0
	rs := []rune(s)
	for i := 0; i < len(rs); i++ {
		r := rs[i]
		switch {
		case r == '\\' && i+1 < len(rs):
			cur.WriteRune(r)
			cur.WriteRune(rs[i+1])
			i++
			continue
		case braces && r == '{':
			depth++
		case braces && r == '}' && depth > 0:
			depth--
		case r == sep && depth == 0:
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteRune(r)
	}
	return append(parts, cur.String())
}

func unescape(s string) string {
	var b strings.Builder
	rs := []rune(s)
	for i := 0; i < len(rs); i++ {
		if rs[i] == '\\' && i+1 < len(rs) {
			i++
		}
		b.WriteRune(rs[i])
	}
	return b.String()
}

var indexRe = regexp.MustCompile(`^(.*?)((?:\[[^\]]*\])+)$`)

type keyPart struct {
	name    string
	indexes []int
}

func parseKey(key string) ([]keyPart, error) {
	var parts []keyPart
	for _, seg := range splitUnescaped(key, '.', false) {
		kp := keyPart{}
		if m := indexRe.FindStringSubmatch(seg); m != nil && !strings.HasSuffix(m[1], "\\") {
			kp.name = unescape(m[1])
			for _, ix := range strings.Split(strings.Trim(m[2], "[]"), "][") {
				n, err := strconv.Atoi(ix)
				if err != nil || n < 0 {
					return nil, fmt.Errorf("key %q: bad list index [%s]", key, ix)
				}
				if n > 65536 {
					return nil, fmt.Errorf("key %q: index of %d is greater than maximum supported index of 65536", key, n)
				}
				kp.indexes = append(kp.indexes, n)
			}
		} else {
			kp.name = unescape(seg)
		}
		if kp.name == "" {
			return nil, fmt.Errorf("key %q has an empty part", key)
		}
		parts = append(parts, kp)
	}
	return parts, nil
}

func parseSet(expr string, dst map[string]interface{}, typed bool) error {
	for _, assign := range splitUnescaped(expr, ',', true) {
		if assign == "" {
			continue
		}
		kv := splitUnescaped(assign, '=', true)
		if len(kv) < 2 {
			return fmt.Errorf("key %q has no value", unescape(assign))
		}
		key, raw := kv[0], strings.Join(kv[1:], "=")
		parts, err := parseKey(key)
		if err != nil {
			return err
		}
		var val interface{}
		if typed && strings.HasPrefix(raw, "{") && strings.HasSuffix(raw, "}") {
			list := []interface{}{}
			if inner := raw[1 : len(raw)-1]; inner != "" {
				for _, item := range splitUnescaped(inner, ',', false) {
					list = append(list, typedVal(unescape(item), true))
				}
			}
			val = list
		} else {
			val = typedVal(unescape(raw), typed)
		}
		if err := setPath(dst, parts, val); err != nil {
			return fmt.Errorf("--set %s: %w", assign, err)
		}
	}
	return nil
}

func setPath(m map[string]interface{}, parts []keyPart, val interface{}) error {
	p := parts[0]
	last := len(parts) == 1
	if len(p.indexes) == 0 {
		if last {
			m[p.name] = val
			return nil
		}
		child, ok := m[p.name].(map[string]interface{})
		if !ok {
			child = map[string]interface{}{}
			m[p.name] = child
		}
		return setPath(child, parts[1:], val)
	}
	// a[i][j]...: walk nested lists
	var cur interface{} = m[p.name]
	setter := func(v interface{}) { m[p.name] = v }
	for n, ix := range p.indexes {
		list, _ := cur.([]interface{})
		for len(list) <= ix {
			list = append(list, nil)
		}
		setter(list)
		if n == len(p.indexes)-1 {
			if last {
				list[ix] = val
				return nil
			}
			child, ok := list[ix].(map[string]interface{})
			if !ok {
				child = map[string]interface{}{}
				list[ix] = child
			}
			return setPath(child, parts[1:], val)
		}
		l, i := list, ix
		cur = list[ix]
		setter = func(v interface{}) { l[i] = v }
	}
	return nil
}

// ---------------------------------------------------------------------------------
// engine

const recursionMax = 1000

type engine struct {
	includes map[string]int
}

// warnWrap marks a message from required/fail so errors show it without Go's prefix.
const warnStart, warnEnd = "HELM_ERR_START", "HELM_ERR_END"

var warnRe = regexp.MustCompile(warnStart + `(.*)` + warnEnd)

func (e *engine) funcs(t *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = func(v interface{}) string {
		data, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(data), "\n")
	}
	f["mustToYaml"] = func(v interface{}) (string, error) {
		data, err := yaml.Marshal(v)
		if err != nil {
			return "", err
		}
		return strings.TrimSuffix(string(data), "\n"), nil
	}
	f["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["fromYamlArray"] = func(s string) []interface{} {
		a := []interface{}{}
		if err := yaml.Unmarshal([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	f["toJson"] = func(v interface{}) string {
		data, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(data)
	}
	f["mustToJson"] = func(v interface{}) (string, error) {
		data, err := json.Marshal(v)
		return string(data), err
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["fromJsonArray"] = func(s string) []interface{} {
		a := []interface{}{}
		if err := json.Unmarshal([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	f["toToml"] = func(interface{}) (string, error) {
		return "", errors.New("toToml is not supported by the offline renderer (use helm)")
	}
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["required"] = func(warn string, val interface{}) (interface{}, error) {
		if val == nil {
			return val, errors.New(warnStart + warn + warnEnd)
		}
		if s, ok := val.(string); ok && s == "" {
			return val, errors.New(warnStart + warn + warnEnd)
		}
		return val, nil
	}
	f["fail"] = func(msg string) (string, error) {
		return "", errors.New(warnStart + msg + warnEnd)
	}
	f["include"] = func(name string, data interface{}) (string, error) {
		if e.includes[name] > recursionMax {
			return "", fmt.Errorf("rendering template has a nested reference name: %s: unable to execute template", name)
		}
		e.includes[name]++
		defer func() { e.includes[name]-- }()
		var buf strings.Builder
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	f["tpl"] = func(text string, vals map[string]interface{}) (string, error) {
		tv, _ := vals["Template"].(map[string]interface{})
		name, _ := tv["Name"].(string)
		if name == "" {
			return "", fmt.Errorf("cannot retrieve Template.Name from values inside tpl function: %s", text)
		}
		clone, err := t.Clone()
		if err != nil {
			return "", err
		}
		clone.Option("missingkey=zero")
		clone.Funcs(e.funcs(clone))
		nt, err := clone.New(name).Parse(text)
		if err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %w", text, err)
		}
		var buf strings.Builder
		if err := nt.Execute(&buf, vals); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %w", text, err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	return f
}

// templateOrder is Helm's parse order: deeper paths first, then by name (reversed).
func templateOrder(names []string) []string {
	sort.Slice(names, func(i, j int) bool {
		a, b := names[i], names[j]
		ca, cb := strings.Count(a, "/"), strings.Count(b, "/")
		if ca != cb {
			return ca > cb
		}
		return a > b
	})
	return names
}

func cleanError(name string, err error) error {
	msg := err.Error()
	if m := warnRe.FindStringSubmatch(msg); m != nil {
		loc := ""
		if tok := strings.SplitN(msg, ": ", 3); len(tok) == 3 {
			loc = tok[1]
		}
		return fmt.Errorf("execution error at (%s): %s", loc, m[1])
	}
	return fmt.Errorf("rendering %s: %w", name, err)
}

func render(c *chartDir, top map[string]interface{}) (map[string]string, error) {
	e := &engine{includes: map[string]int{}}
	t := template.New("gotpl")
	t.Option("missingkey=zero")
	t.Funcs(e.funcs(t))
	names := make([]string, 0, len(c.templates))
	for rel := range c.templates {
		names = append(names, path.Join(c.meta.Name, rel))
	}
	names = templateOrder(names)
	for _, name := range names {
		rel := strings.TrimPrefix(name, c.meta.Name+"/")
		if _, err := t.New(name).Parse(c.templates[rel]); err != nil {
			return nil, fmt.Errorf("parse error in %s: %w", name, err)
		}
	}
	out := map[string]string{}
	for _, name := range names {
		if strings.HasPrefix(path.Base(name), "_") {
			continue
		}
		top["Template"] = map[string]interface{}{"Name": name, "BasePath": path.Join(c.meta.Name, "templates")}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, name, top); err != nil {
			return nil, cleanError(name, err)
		}
		out[name] = strings.ReplaceAll(buf.String(), "<no value>", "")
	}
	return out, nil
}

// ---------------------------------------------------------------------------------
// manifests

var installOrder = []string{
	"PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
	"PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
	"PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole",
	"ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding",
	"RoleBindingList", "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
	"HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
}

type head struct {
	Kind     string `json:"kind"`
	Metadata *struct {
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
}

type manifest struct {
	source, content, kind string
	hookWeight            int
}

var docSep = regexp.MustCompile(`(?:^|\s*\n)---\s*`)

func manifests(rendered map[string]string) ([]manifest, []manifest, error) {
	paths := make([]string, 0, len(rendered))
	for p := range rendered {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	var generic, hooks []manifest
	for _, p := range paths {
		content := rendered[p]
		if strings.TrimSpace(content) == "" {
			continue
		}
		for _, doc := range docSep.Split(strings.TrimSpace(content), -1) {
			doc = strings.TrimSpace(doc)
			if doc == "" {
				continue
			}
			var h head
			if err := yaml.Unmarshal([]byte(doc), &h); err != nil {
				return nil, nil, fmt.Errorf("YAML parse error on %s: %w", p, err)
			}
			m := manifest{source: p, content: doc, kind: h.Kind}
			if h.Metadata != nil && h.Metadata.Annotations["helm.sh/hook"] != "" {
				m.hookWeight, _ = strconv.Atoi(h.Metadata.Annotations["helm.sh/hook-weight"])
				hooks = append(hooks, m)
				continue
			}
			generic = append(generic, m)
		}
	}
	rank := map[string]int{}
	for i, k := range installOrder {
		rank[k] = i
	}
	less := func(a, b manifest) bool {
		ra, aok := rank[a.kind]
		rb, bok := rank[b.kind]
		switch {
		case !aok && !bok:
			return a.kind < b.kind
		case !aok:
			return false
		case !bok:
			return true
		}
		return ra < rb
	}
	sort.SliceStable(generic, func(i, j int) bool { return less(generic[i], generic[j]) })
	sort.SliceStable(hooks, func(i, j int) bool {
		if hooks[i].hookWeight != hooks[j].hookWeight {
			return hooks[i].hookWeight < hooks[j].hookWeight
		}
		return less(hooks[i], hooks[j])
	})
	return generic, hooks, nil
}

// ---------------------------------------------------------------------------------

func run(argv []string, stdout io.Writer) error {
	o, err := parseArgs(argv)
	if err != nil {
		return err
	}
	c, err := loadChart(o.chart)
	if err != nil {
		return err
	}
	caps, err := capabilities(o.kubeVersion, o.apiVersions)
	if err != nil {
		return err
	}
	if c.meta.KubeVersion != "" {
		cons, err := semver.NewConstraint(c.meta.KubeVersion)
		if err != nil {
			return fmt.Errorf("Chart.yaml: kubeVersion %q: %w", c.meta.KubeVersion, err)
		}
		kv, _ := semver.NewVersion(caps.KubeVersion.Version)
		if !cons.Check(kv) {
			return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s",
				c.meta.KubeVersion, caps.KubeVersion.Version)
		}
	}
	user := map[string]interface{}{}
	for _, f := range o.valueFiles {
		m, err := readValueFile(f)
		if err != nil {
			return err
		}
		user = mergeMaps(user, m)
	}
	for _, s := range o.sets {
		if err := parseSet(s.expr, user, s.typed); err != nil {
			return fmt.Errorf("failed parsing --set data: %w", err)
		}
	}
	values := coalesce(user, c.values)
	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": o.release, "Namespace": o.namespace, "IsUpgrade": false, "IsInstall": true,
			"Revision": 1, "Service": "Helm",
		},
		"Chart":        c.meta,
		"Capabilities": caps,
		"Files":        c.files,
	}
	rendered, err := render(c, top)
	if err != nil {
		return err
	}
	notes := ""
	for name, text := range rendered {
		if strings.HasSuffix(name, "NOTES.txt") {
			if name == path.Join(c.meta.Name, "templates", "NOTES.txt") {
				notes = text
			}
			delete(rendered, name)
		}
	}
	if o.notes {
		_, err := io.WriteString(stdout, notes)
		return err
	}
	generic, hooks, err := manifests(rendered)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	for _, m := range generic {
		fmt.Fprintf(&b, "---\n# Source: %s\n%s\n", m.source, m.content)
	}
	out := strings.TrimSpace(b.String())
	b.Reset()
	b.WriteString(out + "\n")
	for _, m := range hooks {
		fmt.Fprintf(&b, "---\n# Source: %s\n%s\n", m.source, m.content)
	}
	_, err = stdout.Write(b.Bytes())
	return err
}

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "Error: %v\n", err)
		os.Exit(1)
	}
}
